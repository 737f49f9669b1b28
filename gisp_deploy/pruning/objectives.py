"""Objective gradients: Ḡ = Σ_i w_i ∇ mean-NLL(sequence i), accumulated in fp32 for the scored weights."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn as nn

from ..data import Calibration
from ..families import ATTN_PROJS, MLP_PROJS, ModelShape, layer_modules
from ..loss import sequence_nll


def scored_weights(model: nn.Module, shape: ModelShape, unit: str, layers=None) -> dict[str, nn.Parameter]:
    """The weights whose gradients the scores read (of `layers`, default all); under query-head units on a
    GQA model the reference scores q and o only, so k and v need no gradient."""
    skip_kv = unit == "q_head" and shape.is_gqa
    out = {}
    for layer in range(shape.num_layers) if layers is None else layers:
        attn, mlp = layer_modules(model, layer)
        for name in ATTN_PROJS:
            if not (skip_kv and name in ("k_proj", "v_proj")):
                out[f"{layer}.{name}"] = getattr(attn, name).weight
        for name in MLP_PROJS:
            out[f"{layer}.{name}"] = getattr(mlp, name).weight
    return out


class LeadingCache:
    """The hidden states entering layer `count`, per micro-batch, kept from the first pass that computes them.

    GISP never prunes the leading protected layers and never changes their inputs, so their outputs are the same
    at every step; later passes start at layer `count` from these (bit-identical, nothing recomputed). A pass
    that needs gradients of those layers' weights runs them as usual. They are kept in host memory (N × T ×
    hidden values: 4.2 GB for 2000 × 256 tokens of a 7B model) and copied to the device per micro-batch, a few
    milliseconds against the pass's seconds, so they take no GPU memory from the micro-batches."""

    def __init__(self, count: int):
        self.count = count
        self.hidden: list[torch.Tensor] = []
        self.batch_size: int | None = None

    def ready(self, batch_size: int, batches: int) -> bool:
        return self.batch_size == batch_size and len(self.hidden) == batches

    @contextlib.contextmanager
    def recording(self, model: nn.Module, batch_size: int):
        self.hidden, self.batch_size = [], batch_size

        def keep(_module, _args, out):
            self.hidden.append((out[0] if isinstance(out, tuple) else out).detach().to("cpu"))

        handle = model.model.layers[self.count - 1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def skipping(self, model: nn.Module):
        layers = model.model.layers
        model.model.layers = nn.ModuleList(list(layers)[self.count:])
        try:
            yield
        finally:
            model.model.layers = layers

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.hidden)


class GradientSums(NamedTuple):
    """What one scoring pass accumulates, fp32, keyed like the weights it was given."""

    grad: dict[str, torch.Tensor]  # Ḡ = Σ_i w_i ∇nll_i
    fisher: dict[str, torch.Tensor] | None  # Σ_i w_i (∇nll_i)², the diagonal empirical Fisher; when asked


def objective_gradient(model: nn.Module, weights: dict[str, nn.Parameter], calib: Calibration,
                       batch_size: int, progress=None, leading: LeadingCache | None = None,
                       reduce=None) -> dict[str, torch.Tensor]:
    """Σ_i w_i ∇ nll_i for each weight in `weights`, as fp32 tensors; the model is left unchanged."""
    return objective_sums(model, weights, calib, batch_size, progress, leading, reduce).grad


def objective_sums(model: nn.Module, weights: dict[str, nn.Parameter], calib: Calibration,
                   batch_size: int, progress=None, leading: LeadingCache | None = None,
                   reduce=None, fisher: bool = False) -> GradientSums:
    """Ḡ = Σ_i w_i ∇ nll_i for each weight in `weights` (fp32) and, with `fisher`, Σ_i w_i (∇ nll_i)² from each
    sequence's own gradient (`PerSampleSquares`), so neither depends on the micro-batch.

    Only `weights` require gradients, so autograd computes no other weight gradient and stops at the first
    layer that holds one of them. Each micro-batch's gradient is added into its fp32 sum from inside the
    backward pass, as soon as it is ready, and freed there: no model-dtype gradient outlives its layer's
    backward, and no separate pass over the weights follows it. `leading` skips the leading protected layers
    once their outputs are known (unless `weights` holds one of their weights). `reduce` (data parallel:
    distributed.Ranks.sum) adds the sums of all processes, each of which was given its share of `calib`."""
    wanted = {id(p) for p in weights.values()}
    saved = {}
    for p in model.parameters():
        saved[p] = p.requires_grad
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    acc = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in weights.items()}

    def accumulate(key):
        def hook(p):
            acc[key].add_(p.grad)
            p.grad = None
        return hook

    hooks = [p.register_post_accumulate_grad_hook(accumulate(k)) for k, p in weights.items()]
    squares = PerSampleSquares(model, weights) if fisher else None
    device = model.get_input_embeddings().weight.device
    batches = -(-int(calib.input_ids.shape[0]) // batch_size)
    context, replay = contextlib.nullcontext(), False
    if leading is not None and leading.count > 0 and not any(int(k.split(".")[0]) < leading.count for k in weights):
        replay = leading.ready(batch_size, batches)
        context = leading.skipping(model) if replay else leading.recording(model, batch_size)
    try:
        with context:
            for b, (ids, att, lmask, w) in enumerate(calib.batches(batch_size)):
                ids, att, lmask = ids.to(device), att.to(device), lmask.to(device)
                hidden = leading.hidden[b].to(device) if replay else None  # [B, T, D]
                if squares is not None:
                    squares.sample_weights = w.tolist()
                nll = sequence_nll(model, ids, att, lmask, hidden)  # [B]
                (nll * w.to(device=nll.device, dtype=torch.float32)).sum().backward()
                if progress is not None:
                    progress(int(ids.shape[0]) * int(ids.shape[1]))
    finally:
        for h in hooks:
            h.remove()
        if squares is not None:
            squares.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    if reduce is not None:
        reduce(acc.values())
        if squares is not None:
            reduce(squares.sums.values())
    return GradientSums(acc, squares.sums if squares is not None else None)


class PerSampleSquares:
    """Σ_i w_i (∇_W nll_i)² for the Linear weights W in `weights`, accumulated in fp32 during backward passes.

    A Linear's gradient from sequence i alone is Σ_t δ_it x_itᵀ (δ: the gradient at its output, x: its input),
    so each sequence's gradient is one [out, T] x [T, in] product of what the pass already has: the forward
    hook keeps x, a hook on the output's gradient forms the product per sequence, squares it and adds it in.
    The backward's loss is Σ_i w_i nll_i, so δ_i carries w_i: (w_i g_i)² / w_i = w_i g_i² (w_i > 0; the
    objectives that score second order have positive weights). Costs one more weight-gradient's FLOPs."""

    def __init__(self, model: nn.Module, weights: dict[str, nn.Parameter]):
        key_of = {id(p): k for k, p in weights.items()}
        self.sums = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in weights.items()}
        self.sample_weights: list[float] = []  # w_i of the micro-batch being run
        self.handles = []
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in key_of:
                self.handles.append(module.register_forward_hook(self._forward(key_of[id(module.weight)])))
        if len(self.handles) != len(weights):
            raise ValueError("second-order scores need every scored weight to be an nn.Linear's weight")

    def _forward(self, key: str):
        def hook(_module, args, out):
            if not out.requires_grad:
                return
            x = args[0].detach()  # [B, T, in]
            w = self.sample_weights  # [B]
            out.register_hook(lambda delta: self._add(key, x, delta, w))
        return hook

    def _add(self, key: str, x: torch.Tensor, delta: torch.Tensor, w: list[float]) -> None:
        total = self.sums[key]
        for i, w_i in enumerate(w):  # one sequence at a time: [out, in] of memory, not [B, out, in]
            if w_i > 0:
                g = delta[i].float().T @ x[i].float()  # [out, in] = [out, T] @ [T, in]: w_i ∇nll_i
                total.addcmul_(g, g, value=1 / w_i)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


AUTO_BATCH_CPU = 16  # CPU throughput barely grows beyond this; memory is rarely the limit there


def fit_batch_size(model: nn.Module, weights: dict[str, nn.Parameter], calib: Calibration, cap: int = 64,
                   fisher: bool = False) -> int:
    """The micro-batch for `objective_gradient` when none is given: on a GPU the largest power of two up to
    `cap` (and the sample count) whose forward+backward fits, found by running one; on the CPU 16.

    Batching does not change Ḡ (a weighted sum over sequences), only the speed: larger micro-batches keep the
    GPU's matmuls busy (DESIGN §8: 30% MFU at 2 × 256 tokens, 57% at 16 × 256)."""
    n = int(calib.input_ids.shape[0])
    if model.get_input_embeddings().weight.device.type != "cuda":
        return min(AUTO_BATCH_CPU, n)

    def runs(size: int) -> None:
        objective_sums(model, weights, calib.select(slice(size)), size, fisher=fisher)

    return largest_fitting(min(cap, n), runs)


def largest_fitting(limit: int, runs) -> int:
    """The largest power of two <= `limit` for which `runs(size)` does not run out of GPU memory."""
    size = 1 << (limit.bit_length() - 1)
    while True:
        try:
            runs(size)
            return size
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size //= 2
        finally:
            torch.cuda.empty_cache()
