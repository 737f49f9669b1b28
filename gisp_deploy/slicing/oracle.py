"""The correctness oracle of a slice: the dense model with the slice's removed structures zeroed."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..families import layer_modules
from ..layout import head_rows


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
