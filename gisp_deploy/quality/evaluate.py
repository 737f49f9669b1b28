"""Held-out perplexity of slices (non-overlapping windows, LLM-Pruner style)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data import token_stream
from ..hf import load_model
from ..loss import sequence_nll
from ..plan import plan_slice
from ..slicing.loader import load
from ..slicing.oracle import OracleSlicer
from .lm_eval import LmEvalTasks, check_options, prepare_tasks, run_lm_eval
from .tasks import task_accuracy


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int, batch_size: int = 16, progress=None) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping `seq_len` windows of `tokens` (tail dropped); also the count
    of predicted tokens."""
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
        if progress:
            progress(batch.numel())
    count = n * (seq_len - 1)
    return math.exp(total / count), count


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
                    progress=None, lm_eval_tasks=None, lm_eval_limit: int | None = None,
                    num_fewshot: int | None = None) -> list[dict]:
    """A perplexity record per (text, seq_len), an accuracy record per task and (with `lm_eval_tasks`, prepared by
    lm_eval.prepare_tasks) an lm_eval record per (task, metric), without the slice's identity."""
    records = []
    for name, stream in streams.items():
        for L in seq_lens:
            ppl, count = perplexity(model, stream, L, batch_size, progress)
            records.append({"measure": "perplexity", "text": name, "seq_len": L, "perplexity": ppl, "tokens": count})
    for task in tasks:
        records.append({"measure": "accuracy", **task_accuracy(model, tokenizer, task, batch_size=batch_size)})
    if lm_eval_tasks is not None:
        records += run_lm_eval(model, tokenizer, lm_eval_tasks, batch_size=batch_size, limit=lm_eval_limit,
                               num_fewshot=num_fewshot)
    return records


def evaluate_slices(artifact, tokenizer, sparsities, texts=(), seq_lens=(128,), *, path: str = "compact",
                    device="cpu", dtype=torch.float32, tp_size: int = 1, channel_multiple: int = 1,
                    max_tokens: int | None = 65536, batch_size: int = 16, progress=None, tasks=(), lm_eval_tasks=(),
                    lm_eval_limit: int | None = None, num_fewshot: int | None = None,
                    lm_eval_include_path=None) -> list[dict]:
    """Measurement records of slices: perplexity per (sparsity, text, seq_len), accuracy per (sparsity, task),
    and lm-eval's metrics per (sparsity, lm-eval task, metric) — `lm_eval_tasks`: names in lm-eval's index or
    task YAML paths, resolved and their data read before any slice is loaded (or lm_eval.prepare_tasks'
    result); `lm_eval_limit`: the first N items of each. path="compact" loads each slice as a smaller model;
    "oracle" zeroes the removed structures of the dense model (what the compact model must compute)."""
    if path not in ("compact", "oracle"):
        raise ValueError(f"unknown evaluation path {path!r}; choose compact or oracle")
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
        model = slicer.apply(plan) if slicer else load(artifact, plan=plan, device=device, dtype=dtype)
        base = {**slice_identity(artifact, plan), "path": path}
        records += [{**base, **r} for r in measure_quality(model, tokenizer, streams, seq_lens, tasks,
                                                           batch_size=batch_size, progress=progress,
                                                           lm_eval_tasks=prepared, lm_eval_limit=lm_eval_limit,
                                                           num_fewshot=num_fewshot)]
        del model
    return records
