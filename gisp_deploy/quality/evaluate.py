"""Held-out perplexity of slices (non-overlapping windows, LLM-Pruner style)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data import token_stream
from ..hf import load_model
from ..loss import sequence_nll
from ..plan import plan_slice
from ..refit import DEFAULT_RIDGE
from ..slicing.loader import load
from ..slicing.oracle import OracleSlicer
from .lm_eval import LmEvalTasks, check_options, prepare_tasks, run_lm_eval
from .tasks import Progress, task_accuracy


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int, batch_size: int = 16, advance=None) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping `seq_len` windows of `tokens` (tail dropped); also the count
    of predicted tokens. advance(n) is told of the n tokens of each batch (window_tokens(...) in all)."""
    n = len(tokens) // seq_len
    if n == 0:
        raise ValueError(f"text has {len(tokens)} tokens, fewer than one {seq_len}-token window")
    windows = tokens[: n * seq_len].view(n, seq_len)  # [N, T]
    dev = next(model.parameters()).device
    total = 0.0
    for batch in windows.split(batch_size):
        batch = batch.to(dev)
        ones = torch.ones_like(batch)
        total += float(sequence_nll(model, batch, ones, ones).double().sum()) * (seq_len - 1)
        if advance:
            advance(batch.numel())
    count = n * (seq_len - 1)
    return math.exp(total / count), count


def window_tokens(tokens: torch.Tensor, seq_len: int) -> int:
    """Tokens the perplexity windows of `tokens` read: whole windows only."""
    return len(tokens) // seq_len * seq_len


def describe_pass(label: str, name: str, limit: int = 48) -> str:
    """A progress description, `label` first ("s=0.4 persuasion.txt.gz"); a very long file name keeps its start
    and end."""
    if len(name) > limit:
        name = f"{name[:limit // 2 - 1]}…{name[-(limit // 2):]}"
    return f"{label} {name}" if label else name


def slice_identity(artifact, plan) -> dict:
    """The fields every measurement record of a slice starts with (README, "Measurement records")."""
    return {"artifact": str(artifact.path), "name": Path(artifact.path).name, "method": artifact.manifest.get("method"),
            "unit": plan.unit, "sparsity": plan.sparsity, "achieved_sparsity": round(plan.achieved_sparsity, 6)}


def text_streams(tokenizer, texts, max_tokens: int | None) -> dict[str, torch.Tensor]:
    """File name -> its first `max_tokens` tokens (all with None)."""
    streams = {}
    for t in texts:
        stream = token_stream(tokenizer, [t])
        streams[Path(t).name] = stream[:max_tokens] if max_tokens else stream
    return streams


def measure_quality(model, tokenizer, streams: dict, seq_lens=(128,), tasks=(), *, batch_size: int = 16,
                    progress: Progress | None = None, label: str = "", lm_eval_tasks=None,
                    lm_eval_limit: int | None = None, num_fewshot: int | None = None) -> list[dict]:
    """A perplexity record per (text, seq_len), an accuracy record per task and (with `lm_eval_tasks`, prepared by
    lm_eval.prepare_tasks) an lm_eval record per (task, metric), without the slice's identity. `progress` is told
    of one pass per text (its tokens over every seq_len) and one per task (its items), each described as `label`
    and the file's name."""
    records = []
    for name, stream in streams.items():
        advance = None
        if progress:
            advance = progress(describe_pass(label, name), sum(window_tokens(stream, L) for L in seq_lens), "tokens")
        for L in seq_lens:
            ppl, count = perplexity(model, stream, L, batch_size, advance)
            records.append({"measure": "perplexity", "text": name, "seq_len": L, "perplexity": ppl, "tokens": count})
    named = (lambda name, total, unit: progress(describe_pass(label, name), total, unit)) if progress else None
    for task in tasks:
        records.append({"measure": "accuracy", **task_accuracy(model, tokenizer, task, batch_size=batch_size,
                                                               progress=named)})
    if lm_eval_tasks is not None:
        records += run_lm_eval(model, tokenizer, lm_eval_tasks, batch_size=batch_size, limit=lm_eval_limit,
                               num_fewshot=num_fewshot)
    return records


def evaluate_slices(artifact, tokenizer, sparsities, texts=(), seq_lens=(128,), *, path: str = "compact",
                    device="cpu", dtype=torch.float32, tp_size: int = 1, channel_multiple: int = 1,
                    max_tokens: int | None = 65536, batch_size: int = 16, progress: Progress | None = None,
                    tasks=(), lm_eval_tasks=(), lm_eval_limit: int | None = None, num_fewshot: int | None = None,
                    lm_eval_include_path=None, refit: str = "none", ridge: float = DEFAULT_RIDGE) -> list[dict]:
    """Measurement records of slices: perplexity per (sparsity, text, seq_len), accuracy per (sparsity, task),
    and lm-eval's metrics per (sparsity, lm-eval task, metric) — `lm_eval_tasks`: names in lm-eval's index or
    task YAML paths, resolved and their data read before any slice is loaded (or lm_eval.prepare_tasks'
    result); `lm_eval_limit`: the first N items of each. path="compact" loads each slice as a smaller model;
    "oracle" zeroes the removed structures of the dense model (what the compact model must compute).
    refit: the load-time correction of each compact slice (load(..., refit=, ridge=)); records carry it as "refit".
    progress(description, total, unit) -> advance(n), if given, is called before each pass, one per slice and
    text ("s=0.4 persuasion.txt.gz", its tokens) and per slice and task (its items); the pass then calls
    advance(n) as n more are done, up to its total."""
    if path not in ("compact", "oracle"):
        raise ValueError(f"unknown evaluation path {path!r}; choose compact or oracle")
    if refit != "none" and path == "oracle":
        raise ValueError("a corrected slice's oracle is slicing.oracle.corrected_oracle; evaluate it with path=compact")
    prepared = None
    if lm_eval_tasks:
        check_options(lm_eval_limit, num_fewshot)
        prepared = lm_eval_tasks if isinstance(lm_eval_tasks, LmEvalTasks) else \
            prepare_tasks(lm_eval_tasks, include_path=lm_eval_include_path)
    streams = text_streams(tokenizer, texts, max_tokens)
    slicer = None
    if path == "oracle":
        slicer = OracleSlicer(load_model(artifact.weights_dir, torch.device(device), dtype,
                                         links_may_leave=not artifact.manifest["weights"]["copied"]))
    records = []
    for s in sparsities:
        plan = plan_slice(artifact.ranking, s, tp_size=tp_size, channel_multiple=channel_multiple)
        model = slicer.apply(plan) if slicer else load(artifact, plan=plan, device=device, dtype=dtype, refit=refit,
                                                       ridge=ridge)
        applied = (getattr(model.config, "gisp_refit", None) or {}).get("name", "none")
        base = {**slice_identity(artifact, plan), "path": path, "refit": applied}
        records += [{**base, **r} for r in measure_quality(model, tokenizer, streams, seq_lens, tasks,
                                                           batch_size=batch_size, progress=progress, label=f"s={s:g}",
                                                           lm_eval_tasks=prepared, lm_eval_limit=lm_eval_limit,
                                                           num_fewshot=num_fewshot)]
        del model
    return records
