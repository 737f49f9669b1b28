"""Objective gradients: Ḡ = Σ_i w_i ∇ mean-NLL(sequence i), accumulated in fp32 for the scored weights."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Calibration
from .families import ATTN_PROJS, MLP_PROJS, ModelShape, layer_modules


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


def sequence_nll(model: nn.Module, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Mean NLL over each sequence's loss-masked target tokens: [B]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [B, T, V]
    targets = input_ids[:, 1:]  # [B, T-1]
    mask = loss_mask[:, 1:].to(torch.float32)  # [B, T-1]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # [B, T-1]
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def objective_gradient(model: nn.Module, weights: dict[str, nn.Parameter], calib: Calibration,
                       batch_size: int, progress=None) -> dict[str, torch.Tensor]:
    """Σ_i w_i ∇ nll_i for each weight in `weights`, as fp32 tensors; the model is left unchanged.

    Only `weights` require gradients, so autograd computes no other weight gradient and stops at the first
    layer that holds one of them. Each micro-batch's gradient is added into its fp32 sum from inside the
    backward pass, as soon as it is ready, and freed there: no model-dtype gradient outlives its layer's
    backward, and no separate pass over the weights follows it."""
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
    device = model.get_input_embeddings().weight.device
    try:
        for ids, att, lmask, w in calib.batches(batch_size):
            ids, att, lmask = ids.to(device), att.to(device), lmask.to(device)
            nll = sequence_nll(model, ids, att, lmask)  # [B]
            (nll * w.to(device=nll.device, dtype=torch.float32)).sum().backward()
            if progress is not None:
                progress(int(ids.shape[0]) * int(ids.shape[1]))
    finally:
        for h in hooks:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    return acc


AUTO_BATCH_CPU = 16  # CPU throughput barely grows beyond this; memory is rarely the limit there


def fit_batch_size(model: nn.Module, weights: dict[str, nn.Parameter], calib: Calibration, cap: int = 64) -> int:
    """The micro-batch for `objective_gradient` when none is given: on a GPU the largest power of two up to
    `cap` (and the sample count) whose forward+backward fits, found by running one; on the CPU 16.

    Batching does not change Ḡ (a weighted sum over sequences), only the speed: larger micro-batches keep the
    GPU's matmuls busy (DESIGN §8: 30% MFU at 2 × 256 tokens, 57% at 16 × 256)."""
    n = int(calib.input_ids.shape[0])
    if model.get_input_embeddings().weight.device.type != "cuda":
        return min(AUTO_BATCH_CPU, n)
    size = 1 << (min(cap, n).bit_length() - 1)
    while True:
        probe = dataclasses.replace(calib, **{f: getattr(calib, f)[:size] for f in
                                              ("input_ids", "attention_mask", "loss_mask", "weight")})
        try:
            objective_gradient(model, weights, probe, size)
            return size
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size //= 2
        finally:
            torch.cuda.empty_cache()
