"""One `prune` run end to end: load, calibrate, rank (resumably), write the artifact atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
import uuid
from pathlib import Path

import torch

from .. import __version__
from ..arguments import GRADIENT_METHODS
from ..artifact import ArtifactError, check_weights_dir, is_artifact, resolve_model_dir, write_artifact
from ..data import load_calibration
from ..families import ModelShape
from ..hf import load_model, load_tokenizer, pick_device, pick_dtype
from ..integrity import refuse_remote_code
from ..output import WriteError, ensure_writable_parent, output_lock, refuse_destination, sweep_stale
from .distributed import Ranks
from .methods import ComputeOptions, PruneConfig, prune as rank_structures
from .objectives import fit_batch_size, scored_weights
from .placement import describe_placement, load_placed, plan_placement
from .progress import RunProgress, drop_finished_progress
from .scoring import NEEDS_FISHER

NEEDS_CALIBRATION = ("gisp", "oneshot", "wanda-sp")


def prune(model: str, *, calib=(), out, method: str = "gisp", objective: str = "lm", unit: str = "q_head",
          steps: int = 20, max_sparsity: float = 0.6, schedule: str = "params", normalization: str | None = None,
          score: str = "first", in_loop_refit: str = "none", protect_first: float = 0.1, protect_last: int = 1,
          samples: int = 128, seq_len: int = 256, batch_size: int | str | None = "auto", seed: int = 0,
          device: str = "auto", device_map: str | None = None, dtype: str = "auto", compute: str = "compact", resume: bool = False, overwrite: bool = False,
          copy_weights: bool = True, rank_ordered: bool | None = None, ranks: Ranks | None = None, on_pass=None,
          log=print) -> dict:
    """`gisp-deploy prune` from Python: rank every head and channel of `model` (a local Hugging Face
    directory) and write the artifact `out`; returns the closing summary. Every option is the command's
    (`gisp-deploy prune --help`); `ranks` defaults to what torchrun announces in the environment.
    `rank_ordered`: write the weights in the ranking's order, so every slice loads as prefixes (rank_order.py);
    None (default): whenever the weights are copied into the artifact."""
    if batch_size == "auto":
        batch_size = None
    elif isinstance(batch_size, str):
        if not batch_size.isdigit():
            raise ValueError(f"--batch-size {batch_size!r}: give a number of sequences, or auto")
        batch_size = int(batch_size)
    cfg = PruneConfig(method=method, unit=unit, objective=objective, steps=steps, max_sparsity=max_sparsity,
                      schedule=schedule, normalization=normalization, score=score, in_loop_refit=in_loop_refit,
                      protect_first=protect_first, protect_last=protect_last, seed=seed, samples=samples, seq_len=seq_len, batch_size=batch_size)
    options = ComputeOptions(compute, ranks=ranks or Ranks.from_env())
    return run_prune(model, list(calib), Path(out), cfg, device=device, dtype=dtype, device_map=device_map,
                     compute=options, resume=resume, overwrite=overwrite, copy_weights=copy_weights,
                     rank_ordered=rank_ordered, on_pass=on_pass, log=log)


def run_prune(model: str, calib_paths: list, out: Path, cfg: PruneConfig, *, device=None, dtype=None,
              device_map: str | None = None, compute: ComputeOptions = ComputeOptions(),
              resume: bool = False, overwrite: bool = False, copy_weights: bool = True,
              rank_ordered: bool | None = None, on_pass=None, log=print) -> dict:
    """Run `cfg.method` on `model` and write the artifact at `out`; return the closing summary.
    `device_map` (auto | balanced | sequential) spreads the layers over the visible GPUs (and CPU memory);
    under torchrun (compute.ranks) every process scores its share of the sequences and rank 0 writes."""
    out, ranks = Path(out), compute.ranks
    with output_lock(out) if ranks.is_main else contextlib.nullcontext():
        return _run(model, calib_paths, out, cfg, device=device, dtype=dtype, device_map=device_map,
                    compute=compute, resume=resume, overwrite=overwrite, copy_weights=copy_weights,
                    rank_ordered=rank_ordered, on_pass=on_pass, log=log)


def _run(model: str, calib_paths: list, out: Path, cfg: PruneConfig, *, device, dtype, device_map,
         compute: ComputeOptions, resume: bool, overwrite: bool, copy_weights: bool, rank_ordered: bool | None,
         on_pass, log) -> dict:
    t0 = time.perf_counter()
    if rank_ordered is None:
        rank_ordered = copy_weights
    if rank_ordered and not copy_weights:
        raise ArtifactError("--rank-ordered writes the weights renumbered into the artifact: drop --no-copy-weights")
    ranks = compute.ranks
    model_dir, shape = _source(model)
    _check_out(out, overwrite, ranks, device, device_map, model_dir)
    dev = ranks.device(pick_device(device))
    dt = pick_dtype(dtype, dev)
    ranks.start(dev)
    placement = plan_placement(model_dir, dt, device_map) if device_map is not None else None
    tokenizer = load_tokenizer(model_dir)
    calib = None
    if cfg.method in NEEDS_CALIBRATION:
        calib = load_calibration(cfg.objective, tokenizer, calib_paths, cfg.samples, cfg.seq_len, cfg.seed)
    run_key = {"config": dataclasses.asdict(cfg), "model": str(model_dir.resolve()), "dtype": str(dt),
               "calibration": calib.fingerprint["sha256"] if calib else None}
    progress = RunProgress(out, run_key, ranks)
    state = progress.resume(resume, log)
    if placement is not None:
        log(f"layers placed with accelerate ({device_map}): {describe_placement(placement)}")
        dense = load_placed(model_dir, dt, placement)
    else:
        dense = load_model(model_dir, dev, dt, links_may_leave=True)
    run_cfg = _fit_batch(cfg, dense, shape, calib, ranks, log)
    tokens = TokenCount(on_pass)
    ranking = rank_structures(dense, shape, calib, run_cfg, state=state, on_step=progress.checkpoint,
                              on_pass=tokens.on_pass, compute=compute)
    elapsed = time.perf_counter() - t0
    scored = tokens.total(ranks, dev)
    if not ranks.is_main:  # every rank holds the same ranking; rank 0 writes it
        return {"artifact": None, "rank": ranks.rank, "wall_s": elapsed, "tokens_scored": scored}
    where = str(dev) if placement is None else f"{device_map}: {describe_placement(placement)}"
    manifest = _manifest(cfg, run_cfg, shape, calib, model, compute, where=where, dtype=dt, elapsed=elapsed,
                         tokens=scored)
    _write(out, model_dir, ranking, manifest, progress, copy_weights=copy_weights, overwrite=overwrite,
           calibration=calib, rank_ordered=rank_ordered, report=on_pass)
    return {"artifact": str(out), "method": cfg.method, "coverage": ranking.coverage,
            "structures": len(ranking), "covered": ranking.num_covered,
            "wall_s": time.perf_counter() - t0, "tokens_scored": scored,
            "tokens_per_s": scored / max(elapsed, 1e-9)}


def _check_out(out: Path, overwrite: bool, ranks: Ranks, device, device_map, model_dir: Path) -> None:
    """Refuse what cannot work before any loading: conflicting options, an existing or unwritable --out, one
    whose writing would destroy the source model (or anything but an earlier artifact)."""
    if ranks.world > 1 and device_map is not None:
        raise ValueError("--device-map places one model over several GPUs in one process; under torchrun each "
                         "process holds a whole model: use one or the other")
    if device_map is not None and device not in (None, "auto"):
        raise ValueError(f"pass --device {device} or --device-map {device_map}, not both")
    if ranks.is_main:
        sweep_stale(out)  # a writer killed while replacing `out` put back first, so the check below sees it
        drop_finished_progress(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
    refuse_destination(out, [model_dir], overwrite, "artifact", is_artifact)
    ensure_writable_parent(out)  # before any work: the progress directory and the artifact go next to it


def _source(model: str) -> tuple[Path, ModelShape]:
    """The source model's directory and shape; refuses pickles, unreadable configs and unsupported families."""
    from transformers import AutoConfig

    model_dir = resolve_model_dir(model)
    check_weights_dir(model_dir, links_may_leave=True)  # a Hugging Face cache snapshot links to its blobs
    refuse_remote_code(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"{model_dir}: cannot read config.json ({str(e)[:200]})") from None
    return model_dir, ModelShape.from_config(config)


def _fit_batch(cfg: PruneConfig, dense, shape: ModelShape, calib, ranks: Ranks, log) -> PruneConfig:
    """`cfg` with the micro-batch fitted to the device when none was given (gradient methods only)."""
    if cfg.batch_size is not None or cfg.method not in GRADIENT_METHODS:
        return cfg
    size = fit_batch_size(dense, scored_weights(dense, shape, cfg.unit), ranks.shard(calib),
                          fisher=cfg.score in NEEDS_FISHER)
    log(f"micro-batch: {size} sequences of {calib.input_ids.shape[1]} tokens")
    return dataclasses.replace(cfg, batch_size=size)


class TokenCount:
    """Counts the tokens every scoring pass processes, passing progress on to the caller's bar."""

    def __init__(self, on_pass=None):
        self.outer, self.count = on_pass, 0

    def on_pass(self, description: str, total: int):
        advance = self.outer(description, total) if self.outer else None

        def step(n: int) -> None:
            self.count += n
            if advance:
                advance(n)
        return step

    def total(self, ranks: Ranks, device: torch.device) -> int:
        """Tokens scored by all processes together."""
        scored = torch.tensor([float(self.count)], dtype=torch.float64, device=device)
        ranks.sum([scored])
        return int(scored.item())


def _manifest(cfg: PruneConfig, run_cfg: PruneConfig, shape: ModelShape, calib, model: str,
              compute: ComputeOptions, *, where: str, dtype: torch.dtype, elapsed: float, tokens: int) -> dict:
    import transformers

    return {
        "method": cfg.method, "objective": cfg.objective if cfg.method in NEEDS_CALIBRATION else None,
        "schedule": {"kind": cfg.schedule, "steps": cfg.steps if cfg.method == "gisp" else 1,
                     "max_sparsity": cfg.max_sparsity},
        "normalization": cfg.normalization, "score": cfg.score if cfg.method in GRADIENT_METHODS else None,
        "in_loop_refit": (None if cfg.in_loop_refit == "none"
                          else {"name": cfg.in_loop_refit, "ridge": cfg.in_loop_ridge}),
        "seed": cfg.seed,
        "protected_layers": cfg.protected_layers(shape.num_layers),
        "calibration": calib.fingerprint if calib else None,
        "source_model": str(model),
        "options": dataclasses.asdict(cfg),
        "run": {"device": where, "dtype": str(dtype).replace("torch.", ""), "batch_size": run_cfg.batch_size,
                "compute": compute.compute if cfg.method in GRADIENT_METHODS else None,
                "processes": compute.ranks.world, "id": uuid.uuid4().hex,
                "wall_s": round(elapsed, 2), "tokens_scored": tokens},
        "versions": {"gisp_deploy": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }


def _write(out: Path, model_dir: Path, ranking, manifest: dict, progress: RunProgress, *, copy_weights: bool,
           overwrite: bool, calibration=None, rank_ordered: bool = False, report=None) -> None:
    """Write the artifact; on a full disk the finished ranking stays in the progress folder for --resume."""
    progress.mark_finished(manifest["run"]["id"])
    try:
        write_artifact(out, model_dir, ranking, manifest, copy_weights=copy_weights, overwrite=overwrite,
                       calibration=calibration, rank_ordered=rank_ordered, progress=report)
    except WriteError as e:
        if not progress.exists():  # methods without steps keep no progress: they are quick to run again
            raise
        raise WriteError(f"{e.cause}; nothing was written to {out}, and the finished ranking is kept in "
                         f"{progress.dir}: free some space and rerun the same command with --resume (nothing is "
                         "recomputed)", e.cause) from None
    progress.remove()
