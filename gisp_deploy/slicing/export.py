"""Export one slice of an artifact as a Hugging Face model directory that loads without the artifact.

The directory holds the compact model's weights (safetensors, HF names, only what the slice keeps plus the
zero heads that even out KV groups; sharded above 5 GB), the artifact's tokenizer and generation files, a
copy of gisp_deploy/modeling.py as `modeling_gisp.py`, and a config.json with

- `model_type` "gisp_<family>" and `architectures` ["Gisp<Family>ForCausalLM"];
- `gisp_layers`: per-layer widths (see modeling.py), from which the model classes build the layers;
- `gisp_slice`: provenance (source artifact, method, unit, sparsity requested / achieved, rounding,
  ranking sha256 from the artifact manifest, gisp-deploy version);
- `gisp_refit` (a corrected slice, `--refit ls|ec`): the correction's name, ridge and the sha256 of the
  statistics it was computed from; o_proj / down_proj then hold the refitted weights and a bias;
- `auto_map` pointing at modeling_gisp.py, so `AutoModelForCausalLM.from_pretrained(dir,
  trust_remote_code=True)` works where gisp-deploy is not installed (AutoTokenizer needs the flag there too:
  it opens config.json first, whose class is in modeling_gisp.py; README, "Loading an export without
  gisp-deploy"); where it is, `import gisp_deploy` registers the classes and no remote code is needed.

The slice is built in memory by `loader.load` (peak: about the compact model plus one dense tensor) and
written atomically: nothing half-written is ever left at `out`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .. import __version__, modeling
from ..artifact import MANIFEST, ArtifactError, load_artifact, side_files
from ..budget import budget_plan
from ..hf import DTYPES
from ..integrity import inside
from ..output import atomic_dir, ensure_writable_parent, output_lock, refuse_destination, sweep_stale
from ..plan import SlicePlan, plan_slice
from ..arguments import SparsityError, parse_sparsities
from ..refit import DEFAULT_RIDGE
from .loader import load

REMOTE_CODE_FILE = "modeling_gisp.py"
MAX_SHARD_SIZE = "5GB"


def export_dtype(dtype, source_config) -> torch.dtype:
    """`auto`: the dtype of the source checkpoint (config.dtype), float32 when it records none."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        src = getattr(source_config, "dtype", None) or getattr(source_config, "torch_dtype", None)
        if isinstance(src, torch.dtype):
            return src
        return DTYPES.get(str(src).replace("torch.", ""), torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto (the source checkpoint's), float32, bfloat16 or float16")
    return DTYPES[dtype]


def _copied_side_files(artifact_dir: Path) -> list[Path]:
    """Tokenizer, generation config and other small files; not the dense config, the manifest or an index of
    the dense weights, nor anything that would shadow the files the export writes."""
    own = {"config.json", MANIFEST, REMOTE_CODE_FILE}
    return [inside(artifact_dir, f.name, "side file") for f in side_files(artifact_dir)  # no link leaves it
            if f.name not in own and not f.name.endswith(".index.json")]


def is_export(path: Path) -> bool:
    """A directory `gisp-deploy export` wrote: its config has per-layer widths."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and modeling.CONFIG_KEY in cfg.read_text()


def _check_out(out: Path, art, overwrite: bool) -> None:
    refuse_destination(out, {art.path, Path(art.weights_dir)}, overwrite, "export", is_export)
    ensure_writable_parent(out)  # before the slice is built


def export_slice(artifact, out, sparsity: float | None = None, *, plan: SlicePlan | None = None, tp_size: int = 1,
                 channel_multiple: int = 1, dtype="auto", overwrite: bool = False,
                 max_shard_size: str | int = MAX_SHARD_SIZE, verify: bool = True,
                 expect_digest: str | None = None, fit_memory=None, fit_params=None,
                 fit_options: dict | None = None, refit: str = "none", ridge: float = DEFAULT_RIDGE) -> dict:
    """Write the slice of `artifact` (an Artifact or its path) at `sparsity` (or `plan`, or the largest that fits
    `fit_memory` / `fit_params`: budget.fit, with `fit_options` its other keywords) to `out` as a Hugging Face
    model directory (see the module docstring); returns a summary."""
    out = Path(out)
    sweep_stale(out)  # what an export killed mid-way left next to `out`
    if out.exists() and not overwrite:  # before anything is loaded
        raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
    art = artifact if hasattr(artifact, "ranking") else load_artifact(artifact, verify=verify,
                                                                      expect_digest=expect_digest)
    torch_dtype = export_dtype(dtype, art.config)
    plan = plan or budget_plan(art, sparsity, fit_memory=fit_memory, fit_params=fit_params, fit_options=fit_options,
                               dtype=torch_dtype, tp_size=tp_size, channel_multiple=channel_multiple)
    if plan is None:
        if sparsity is None:
            raise SparsityError("pass a sparsity (e.g. --sparsity 0.4) or a budget (--fit-memory 24GiB)")
        sparsities = parse_sparsities(sparsity)
        if len(sparsities) != 1:
            raise SparsityError(f"--sparsity {sparsity!r}: export writes one slice; give one value, e.g. "
                                "--sparsity 0.4")
        (sparsity,) = sparsities
        plan = plan_slice(art.ranking, sparsity, tp_size=tp_size, channel_multiple=channel_multiple)
    elif plan.shape != art.shape:
        raise ValueError("the plan was made for a model of another shape than the artifact's")
    _check_out(out, art, overwrite)
    model = load(art, plan=plan, dtype=torch_dtype, refit=refit, ridge=ridge)  # corrected: config.gisp_refit says so
    config = model.config
    config_cls, model_cls = type(config), type(model)
    config.architectures = [model_cls.__name__]
    config.auto_map = {"AutoConfig": f"{Path(REMOTE_CODE_FILE).stem}.{config_cls.__name__}",
                       "AutoModelForCausalLM": f"{Path(REMOTE_CODE_FILE).stem}.{model_cls.__name__}"}
    config.gisp_slice = {
        **(config.gisp_slice or {}),
        "tp_size": getattr(plan, "tp_size", 1), "channel_multiple": getattr(plan, "channel_multiple", 1),
        "prefix": plan.prefix,
        "source": str(art.path.resolve()), "method": art.manifest.get("method"),
        "ranking_sha256": art.manifest.get("ranking_sha256"), "gisp_deploy": __version__,
    }
    with output_lock(out), atomic_dir(out, overwrite, "export", is_export) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        for f in _copied_side_files(art.path):
            shutil.copy2(f, tmp / f.name)  # verbatim, replacing what save_pretrained derived (generation config)
        shutil.copyfile(modeling.__file__, tmp / REMOTE_CODE_FILE)
        weights = sorted(tmp.glob("*.safetensors"))
        summary = {
            "out": str(out), "model_type": config.model_type, "architecture": model_cls.__name__,
            "sparsity": plan.sparsity, "achieved_sparsity": round(plan.achieved_sparsity, 6),
            "dtype": str(torch_dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(f.stat().st_size for f in weights), "weight_files": [f.name for f in weights],
            "refit": config.gisp_refit,
        }
    return summary
