"""The correctness oracle of a slice: the dense model with the slice's removed structures zeroed, then (for a
corrected slice) the stated correction applied — computed here independently of the loader's streamed one:
whole-model forward passes with hooks on the dense and the zeroed model, in the source numbering."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..families import layer_modules
from ..layout import head_rows
from ..refit import DEFAULT_RIDGE, Moments, error_correcting, least_squares


@torch.no_grad()
def apply_oracle(model: nn.Module, plan) -> None:
    """Zero everything a slice plan removes: the dense model then computes what the slice must."""
    shape = plan.shape
    hd = shape.head_dim
    for layer, lp in enumerate(plan.layers):
        attn, mlp = layer_modules(model, layer)
        dev = attn.q_proj.weight.device
        q_gone = sorted(set(range(shape.num_heads)) - set(lp.q_heads))
        kv_gone = sorted(set(range(shape.num_kv_heads)) - set(lp.kv_heads))
        c_gone = torch.tensor(sorted(set(range(shape.intermediate)) - set(lp.channels)), dtype=torch.long, device=dev)
        q_rows = torch.tensor(head_rows(q_gone, hd), dtype=torch.long, device=dev)
        kv_rows = torch.tensor(head_rows(kv_gone, hd), dtype=torch.long, device=dev)
        for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows),
                           (mlp.gate_proj, c_gone), (mlp.up_proj, c_gone)):
            proj.weight[rows] = 0
            if proj.bias is not None:
                proj.bias[rows] = 0
        attn.o_proj.weight[:, q_rows] = 0
        mlp.down_proj.weight[:, c_gone] = 0


def _consumers(model: nn.Module, layer: int) -> dict[str, nn.Linear]:
    attn, mlp = layer_modules(model, layer)
    return {"o_proj": attn.o_proj, "down_proj": mlp.down_proj}


def _kept_inputs(plan, layer: int) -> dict[str, list[int]]:
    lp = plan.layers[layer]
    return {"o_proj": head_rows(sorted(lp.q_heads), plan.shape.head_dim), "down_proj": sorted(lp.channels)}


def _inputs(model: nn.Module, module: nn.Module, ids, mask) -> torch.Tensor:
    """The inputs of `module` over the real tokens of the windows, [n, in] (one whole-model forward)."""
    seen = []
    hook = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0][mask.bool()]))
    try:
        model(ids, attention_mask=mask)
    finally:
        hook.remove()
    return torch.cat(seen)


def _set(lin: nn.Linear, kept: list[int], weight: torch.Tensor, bias: torch.Tensor) -> None:
    cols = torch.tensor(kept, dtype=torch.long, device=lin.weight.device)
    lin.weight[:, cols] = weight.to(lin.weight)
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype))
    lin.bias.copy_(bias.to(lin.bias))


@torch.no_grad()
def corrected_oracle(dense: nn.Module, plan, ids: torch.Tensor, mask: torch.Tensor, refit: str,
                     ridge: float = DEFAULT_RIDGE) -> nn.Module:
    """A copy of `dense` with the plan's structures zeroed and o_proj / down_proj refitted ("ls" or "ec") on the
    windows `ids` [N, T] (attention `mask` [N, T]); kept columns take the refit, removed ones stay zero."""
    model = copy.deepcopy(dense)
    apply_oracle(model, plan)
    if refit == "none":
        return model
    layers = range(plan.shape.num_layers)
    if refit == "ls":
        moments = {}
        for layer in layers:
            for proj, lin in _consumers(dense, layer).items():
                m = Moments()
                m.add(_inputs(dense, lin, ids, mask))
                moments[layer, proj] = m.mean()
    for layer in layers:
        kept = _kept_inputs(plan, layer)
        for proj, lin in _consumers(dense, layer).items():
            target = _consumers(model, layer)[proj]
            if refit == "ls":
                w, b = least_squares(lin.weight, kept[proj], moments[layer, proj], bias=lin.bias, ridge=ridge)
            else:  # the zeroed model as corrected so far: earlier layers and, for down_proj, this o_proj
                x_d = _inputs(dense, lin, ids, mask)  # [n, in]
                x_k = _inputs(model, target, ids, mask)[:, kept[proj]]  # [n, k]
                cross, gram = Moments(), Moments()
                cross.add(x_d, x_k)
                gram.add(x_k)
                w, b = error_correcting(lin.weight, kept[proj], cross.mean(), gram.mean(), bias=lin.bias, ridge=ridge)
            _set(target, kept[proj], w, b)
    return model


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
