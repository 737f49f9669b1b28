"""One `prune` run end to end: load, calibrate, rank (resumably), write the artifact atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .artifact import (ArtifactError, WriteError, ensure_writable_parent, resolve_model_dir, sweep_stale, weight_files,
                       write_artifact, write_error, write_failure)
from .data import load_calibration
from .families import ModelShape
from .methods import PruneConfig, PruneState, prune
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


def partial_dir(out: Path) -> Path:
    out = Path(out)
    return out.resolve().parent / f".{out.name}.partial"


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
              resume: bool = False, overwrite: bool = False, copy_weights: bool = True,
              on_pass=None, log=print) -> dict:
    """Run `cfg.method` on `model` and write the artifact at `out`; return the closing summary."""
    t0 = time.perf_counter()
    out = Path(out)
    sweep_stale(out)  # a writer killed while replacing `out` put back first, so the check below sees it
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
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tokenizer = load_tokenizer(model_dir)
    calib = None
    if cfg.method in NEEDS_CALIBRATION:
        calib = load_calibration(cfg.objective, tokenizer, calib_paths, cfg.samples, cfg.seq_len, cfg.seed)

    work = partial_dir(out)
    run_key = {"config": dataclasses.asdict(cfg), "model": str(model_dir.resolve()), "dtype": str(dt),
               "calibration": calib.fingerprint["sha256"] if calib else None}
    state = None
    if work.exists() and not (work / "run.json").exists():  # killed before its first step was saved: nothing in it
        shutil.rmtree(work)
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

    dense = load_model(model_dir, dev, dt)
    ranking: Ranking = prune(dense, shape, calib, cfg, state=state, on_step=checkpoint, on_pass=counting_pass)
    elapsed = time.perf_counter() - t0
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
        "run": {"device": str(dev), "dtype": str(dt).replace("torch.", ""), "wall_s": round(elapsed, 2),
                "tokens_scored": tokens["n"]},
        "versions": {"gisp_deploy": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
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
