"""Objective gradients: Ḡ = Σ_i w_i ∇ mean-NLL(sequence i), accumulated in fp32 for the scored weights."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Calibration
from .families import ATTN_PROJS, MLP_PROJS, ModelShape, layer_modules


def scored_weights(model: nn.Module, shape: ModelShape, unit: str) -> dict[str, nn.Parameter]:
    """The weights whose gradients the scores read; under query-head units on a GQA model the
    reference scores q and o only, so k and v need no gradient."""
    skip_kv = unit == "q_head" and shape.is_gqa
    out = {}
    for layer in range(shape.num_layers):
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
    """Σ_i w_i ∇ nll_i for each weight in `weights`, as fp32 tensors; the model is left unchanged."""
    wanted = {id(p) for p in weights.values()}
    saved = {}
    for p in model.parameters():
        saved[p] = p.requires_grad
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    acc = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in weights.items()}
    device = next(iter(weights.values())).device
    try:
        for ids, att, lmask, w in calib.batches(batch_size):
            ids, att, lmask = ids.to(device), att.to(device), lmask.to(device)
            nll = sequence_nll(model, ids, att, lmask)  # [B]
            (nll * w.to(device=device, dtype=torch.float32)).sum().backward()
            for k, p in weights.items():
                if p.grad is not None:
                    acc[k] += p.grad.float()
                    p.grad = None
            if progress is not None:
                progress(int(ids.shape[0]) * int(ids.shape[1]))
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    return acc
