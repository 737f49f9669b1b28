"""One `prune` run end to end: load, calibrate, rank (resumably), write the artifact atomically."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import platform
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .artifact import (MANIFEST, ArtifactError, WriteError, ensure_writable_parent, resolve_model_dir, sweep_stale,
                       weight_files, write_artifact, write_error, write_failure)
from .data import load_calibration
from .families import ModelShape
from .methods import ComputeOptions, PruneConfig, PruneState, prune
from .objectives import fit_batch_size, scored_weights
from .ranking import Ranking

NEEDS_CALIBRATION = ("gisp", "oneshot", "wanda-sp")


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible; use --device cpu")
    return dev


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    return table[dtype]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if model_dir.is_dir() and not any((model_dir / f).is_file() for f in TOKENIZER_FILES) \
            and not any(model_dir.glob("*.tiktoken")):
        raise ArtifactError(f"{model_dir}: no tokenizer (tokenizer.json or tokenizer.model, with "
                            "tokenizer_config.json); copy the tokenizer files of the source model into it")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        detail = " ".join(str(e).split())[:160]  # one line: transformers' messages span several
        raise ArtifactError(f"{model_dir}: cannot load a tokenizer ({type(e).__name__}: {detail}); the directory "
                            "needs tokenizer.json (or tokenizer.model) and tokenizer_config.json, as the source "
                            "model has them") from None


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    weight_files(model_dir)  # refuses pickle-only checkpoints before transformers sees them
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


DEVICE_MAPS = ("auto", "balanced", "sequential")
GRAD_BYTES = 4  # the fp32 gradient sum kept next to each scored weight
ACTIVATION_SHARE = 0.15  # of each GPU's free memory, left for activations of the micro-batches


def plan_placement(model_dir: Path, dtype: torch.dtype, strategy: str, max_memory: dict | None = None) -> dict:
    """A device map (module name -> GPU index or "cpu") for scoring a model too large for one device.

    accelerate sizes it from the weights alone, so each device is offered only the share of its memory that
    the weights may take: the fp32 gradient sums of the scored weights sit next to them on the same device."""
    if strategy not in DEVICE_MAPS:
        raise ValueError(f"--device-map {strategy!r}: choose one of {', '.join(DEVICE_MAPS)}")
    try:
        from accelerate import infer_auto_device_map, init_empty_weights
        from accelerate.utils import get_balanced_memory, get_max_memory
    except ImportError:
        raise ValueError("--device-map needs accelerate: pip install accelerate") from None
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    share = dtype.itemsize / (dtype.itemsize + GRAD_BYTES)
    if max_memory is None:
        max_memory = {k: int(v * share * (1 - ACTIVATION_SHARE if k != "cpu" else 1))
                      for k, v in get_max_memory().items()}
    no_split = meta._no_split_modules
    if strategy in ("auto", "balanced") and any(k != "cpu" for k in max_memory):
        max_memory = get_balanced_memory(meta, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    placement = infer_auto_device_map(meta, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if "disk" in placement.values():
        need = sum(p.numel() for p in meta.parameters()) * (dtype.itemsize + GRAD_BYTES) / 2**30
        raise ValueError(f"the model needs about {need:.0f} GiB for weights and fp32 gradient sums, more than the "
                         "visible GPUs and CPU memory hold; use more GPUs or a machine with more memory")
    return placement


def load_placed(model_dir: Path, dtype: torch.dtype, placement: dict):
    """The model with its layers on the devices of `placement`. Layers placed on "cpu" stay there and run
    there (slowly): their weights must stay real tensors to receive gradients, so they are not offloaded."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    weight_files(model_dir)
    if "cpu" not in placement.values():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                     device_map=placement)
    else:  # transformers would offload the CPU part (weights on meta, no gradients): dispatch it ourselves
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
        quiet = logging.getLogger("accelerate.big_modeling")  # it warns of offloading whenever "cpu" is named
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            model = dispatch_model(model, device_map=placement, main_device="cpu")
        finally:
            quiet.setLevel(level)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters offloaded by accelerate cannot receive gradients: {left[:3]}...")
    return model.eval()


def describe_placement(placement: dict) -> str:
    """E.g. "0: 17 modules, 1: 16 modules, cpu: 2 modules"."""
    if set(placement) == {""}:
        return f"all on {placement['']}"
    counts = collections.Counter(placement.values())
    return ", ".join(f"{d}: {n} module{'s' * (n != 1)}" for d, n in counts.items())


def partial_dir(out: Path) -> Path:
    out = Path(out)
    return out.resolve().parent / f".{out.name}.partial"


FINISHED = "finished"  # in the progress folder: the id of the artifact its finished ranking is written as


def drop_finished_progress(out: Path) -> None:
    """Remove the progress folder of a run that was stopped after its artifact was complete (between the
    artifact's rename and this folder's removal): `out` then carries the id the folder names."""
    marker = partial_dir(out) / FINISHED
    try:
        finished = json.loads((Path(out) / MANIFEST).read_text()).get("run", {}).get("id")
        if finished and marker.read_text().strip() == finished:
            shutil.rmtree(marker.parent, ignore_errors=True)
    except (OSError, ValueError, AttributeError):  # no such artifact or marker: nothing to drop
        return


def save_state(path: Path, state: PruneState) -> None:
    rows = torch.tensor([r[:4] for r in state.removed], dtype=torch.int64).reshape(-1, 4)
    tensors = {"removed": rows, "removed_score": torch.tensor([r[4] for r in state.removed], dtype=torch.float64),
               "last_heads": state.last_heads.contiguous(), "last_channels": state.last_channels.contiguous()}
    tmp = path.with_suffix(".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"step": str(state.step)})
        os.replace(tmp, path)  # the previous step's state stays whole until this one is
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_state(path: Path) -> PruneState:
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        step = int((f.metadata() or {})["step"])
    removed = [(*map(int, r), float(s)) for r, s in zip(t["removed"].tolist(), t["removed_score"].tolist())]
    return PruneState(step=step, removed=removed, last_heads=t["last_heads"], last_channels=t["last_channels"])


def run_prune(model: str, calib_paths: list, out: Path, cfg: PruneConfig, *, device=None, dtype=None,
              device_map: str | None = None, compute: ComputeOptions = ComputeOptions(),
              resume: bool = False, overwrite: bool = False, copy_weights: bool = True,
              on_pass=None, log=print) -> dict:
    """Run `cfg.method` on `model` and write the artifact at `out`; return the closing summary.
    `device_map` (auto | balanced | sequential) spreads the layers over the visible GPUs (and CPU memory);
    under torchrun (compute.ranks) every process scores its share of the sequences and rank 0 writes."""
    t0 = time.perf_counter()
    out = Path(out)
    ranks = compute.ranks
    if ranks.world > 1 and device_map is not None:
        raise ValueError("--device-map places one model over several GPUs in one process; under torchrun each "
                         "process holds a whole model: use one or the other")
    if ranks.is_main:
        sweep_stale(out)  # a writer killed while replacing `out` put back first, so the check below sees it
        drop_finished_progress(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
    ensure_writable_parent(out)  # before any work: the progress directory and the artifact go next to it
    model_dir = resolve_model_dir(model)
    weight_files(model_dir)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"{model_dir}: cannot read config.json ({str(e)[:200]})") from None
    shape = ModelShape.from_config(config)
    if device_map is not None and device not in (None, "auto"):
        raise ValueError(f"pass --device {device} or --device-map {device_map}, not both")
    dev = ranks.device(pick_device(device))
    dt = pick_dtype(dtype, dev)
    ranks.start(dev)
    placement = plan_placement(model_dir, dt, device_map) if device_map is not None else None
    tokenizer = load_tokenizer(model_dir)
    calib = None
    if cfg.method in NEEDS_CALIBRATION:
        calib = load_calibration(cfg.objective, tokenizer, calib_paths, cfg.samples, cfg.seq_len, cfg.seed)

    work = partial_dir(out)
    run_key = {"config": dataclasses.asdict(cfg), "model": str(model_dir.resolve()), "dtype": str(dt),
               "calibration": calib.fingerprint["sha256"] if calib else None}
    state = None
    if ranks.is_main and work.exists() and not (work / "run.json").exists():  # killed before its first step
        shutil.rmtree(work)
    ranks.barrier()
    if work.exists():
        if not resume:
            raise ArtifactError(f"an unfinished run left its progress in {work}; pass --resume to continue it, "
                                "or delete that folder to start over")
        saved = json.loads((work / "run.json").read_text())
        diff = sorted(k for k in set(saved) | set(run_key) if saved.get(k) != run_key.get(k))
        if diff:
            detail = {k: (saved.get(k), run_key.get(k)) for k in diff}
            raise ArtifactError(f"--resume: this run differs from the saved one in {detail}; pass the same options, "
                                f"or delete {work} to start over")
        if (work / "state.safetensors").exists():
            state = load_state(work / "state.safetensors")
            log(f"resuming from step {state.step} ({len(state.removed)} structures removed)")

    tokens = {"n": 0}

    def counting_pass(desc, total):
        advance = on_pass(desc, total) if on_pass else None

        def step(n):
            tokens["n"] += n
            if advance:
                advance(n)
        return step

    def checkpoint(s: PruneState):
        if not ranks.is_main:
            return
        try:
            if not work.exists():  # created at the first completed step, so failed starts leave nothing behind
                work.mkdir(parents=True)
                (work / "run.json.tmp").write_text(json.dumps(run_key, indent=2))
                os.replace(work / "run.json.tmp", work / "run.json")
            save_state(work / "state.safetensors", s)
        except Exception as e:
            if not write_failure(e, work):
                raise
            if (work / "state.safetensors").exists():
                kept = f"progress up to the last completed step is kept in {work}"
                fix = "free some space and rerun the same command with --resume"
            else:
                shutil.rmtree(work, ignore_errors=True)
                kept, fix = "nothing was kept", None
            raise write_error(e, work, kept, work, fix) from None

    if placement is not None:
        log(f"layers placed with accelerate ({device_map}): {describe_placement(placement)}")
        dense = load_placed(model_dir, dt, placement)
    else:
        dense = load_model(model_dir, dev, dt)
    run_cfg = cfg
    if cfg.batch_size is None and cfg.method in ("gisp", "oneshot"):
        run_cfg = dataclasses.replace(cfg, batch_size=fit_batch_size(dense, scored_weights(dense, shape, cfg.unit),
                                                                     ranks.shard(calib)))
        log(f"micro-batch: {run_cfg.batch_size} sequences of {calib.input_ids.shape[1]} tokens")
    ranking: Ranking = prune(dense, shape, calib, run_cfg, state=state, on_step=checkpoint, on_pass=counting_pass,
                             compute=compute)
    elapsed = time.perf_counter() - t0
    scored = torch.tensor([float(tokens["n"])], dtype=torch.float64, device=dev)
    ranks.sum([scored])  # every process's tokens
    tokens["n"] = int(scored.item())
    if not ranks.is_main:  # every rank holds the same ranking; rank 0 writes it
        return {"artifact": None, "rank": ranks.rank, "wall_s": elapsed, "tokens_scored": tokens["n"]}
    import transformers

    manifest = {
        "method": cfg.method, "objective": cfg.objective if cfg.method in NEEDS_CALIBRATION else None,
        "schedule": {"kind": cfg.schedule, "steps": cfg.steps if cfg.method == "gisp" else 1,
                     "max_sparsity": cfg.max_sparsity},
        "normalization": cfg.normalization, "seed": cfg.seed,
        "protected_layers": cfg.protected_layers(shape.num_layers),
        "calibration": calib.fingerprint if calib else None,
        "source_model": str(model),
        "options": dataclasses.asdict(cfg),
        "run": {"device": str(dev) if placement is None else f"{device_map}: {describe_placement(placement)}",
                "dtype": str(dt).replace("torch.", ""), "batch_size": run_cfg.batch_size,
                "compute": compute.compute if cfg.method in ("gisp", "oneshot") else None,
                "processes": ranks.world, "id": uuid.uuid4().hex,
                "wall_s": round(elapsed, 2), "tokens_scored": tokens["n"]},
        "versions": {"gisp_deploy": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    if work.exists():  # a stop after the artifact's rename leaves this folder to the next run to drop
        try:
            (work / FINISHED).write_text(manifest["run"]["id"])
        except OSError:  # only a clean-up hint: the write below reports a full disk
            pass
    try:
        write_artifact(out, model_dir, ranking, manifest, copy_weights=copy_weights, overwrite=overwrite)
    except WriteError as e:
        if not work.exists():  # methods without steps keep no progress: they are quick to run again
            raise
        raise WriteError(f"{e.cause}; nothing was written to {out}, and the finished ranking is kept in {work}: "
                         "free some space and rerun the same command with --resume (nothing is recomputed)",
                         e.cause) from None
    shutil.rmtree(work, ignore_errors=True)
    return {"artifact": str(out), "method": cfg.method, "coverage": ranking.coverage,
            "structures": len(ranking), "covered": ranking.num_covered,
            "wall_s": time.perf_counter() - t0, "tokens_scored": tokens["n"],
            "tokens_per_s": tokens["n"] / max(elapsed, 1e-9)}
