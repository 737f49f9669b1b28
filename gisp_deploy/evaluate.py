"""Held-out perplexity of slices (non-overlapping windows, LLM-Pruner style)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .data import token_stream
from .objectives import sequence_nll
from .loader import load
from .plan import plan_slice
from .scoring import apply_oracle
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


class OracleSlicer:
    """Gives the dense model with a slice's removed structures zeroed; restores it between slices."""

    def __init__(self, model):
        self.model = model
        self.saved = {n: p.detach().clone() for n, p in model.named_parameters() if "_proj." in n}

    @torch.no_grad()
    def apply(self, plan):
        params = dict(self.model.named_parameters())
        for n, v in self.saved.items():
            params[n].copy_(v)
        apply_oracle(self.model, plan)
        return self.model


def evaluate_slices(artifact, tokenizer, sparsities, texts=(), seq_lens=(128,), *, path: str = "compact",
                    device="cpu", dtype=torch.float32, tp_size: int = 1, channel_multiple: int = 1,
                    max_tokens: int | None = 65536, batch_size: int = 16, progress=None, tasks=()) -> list[dict]:
    """One record per (sparsity, text, seq_len) with the slice's perplexity, and per (sparsity, task) with
    its multiple-choice accuracy. path="compact" loads each slice as a smaller model; "oracle" zeroes the
    removed structures of the dense model (what the compact model must compute)."""
    if path not in ("compact", "oracle"):
        raise ValueError(f"unknown evaluation path {path!r}; choose compact or oracle")
    streams = {}
    for t in texts:
        stream = token_stream(tokenizer, [t])
        streams[Path(t).name] = stream[:max_tokens] if max_tokens else stream
    slicer = None
    if path == "oracle":
        from .prune_run import load_model

        slicer = OracleSlicer(load_model(artifact.weights_dir, torch.device(device), dtype))
    records = []
    for s in sparsities:
        plan = plan_slice(artifact.ranking, s, tp_size=tp_size, channel_multiple=channel_multiple)
        model = slicer.apply(plan) if slicer else load(artifact, plan=plan, device=device, dtype=dtype)
        base = {"sparsity": s, "achieved_sparsity": round(plan.achieved_sparsity, 6), "path": path}
        for name, stream in streams.items():
            for L in seq_lens:
                ppl, count = perplexity(model, stream, L, batch_size, progress)
                records.append({**base, "text": name, "seq_len": L, "perplexity": ppl, "tokens": count})
        for task in tasks:
            records.append({**base, **task_accuracy(model, tokenizer, task, batch_size=batch_size)})
        del model
    return records
