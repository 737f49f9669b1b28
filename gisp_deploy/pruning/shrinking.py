"""The model GISP scores, kept physically compact: what a step removed is cut out before the next pass.

A removed structure is zero in the masked model, so it adds nothing to any output and its gradient is never
read (its score |0·Ḡ| is 0). Cutting it out therefore leaves every kept weight's gradient unchanged (the
correctness oracle of DESIGN §3, used the other way round) while each later pass computes only what is left:
under the reference schedule the passes average about a third fewer decoder FLOPs than on the masked model.

Layers are shrunk in place, as `modeling.shrink_layer` builds a slice: query heads grouped by KV head, uneven
groups padded with zero dummy heads, a layer without heads or channels loses that sub-block. Channels may be
padded with zero dummy channels to a multiple of `channel_multiple` (matmul-friendly widths; exact, since a
zero channel contributes nothing). `scores` maps compact gradients back to the source numbering.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..families import ATTN_PROJS, MLP_PROJS, ModelShape
from ..layout import head_rows, select
from ..modeling import EmptyAttention, EmptyMLP, LayerLayout, layer_layout
from ..plan import kept_structures
from ..ranking import units_per_layer
from .scoring import cols_per_unit, rows_per_unit, taylor_importance


def _positions(old_src: tuple[int, ...], new_src: tuple[int, ...]) -> list[int]:
    """Position in the old compact tensor of each new entry's source; -1 for a dummy (zero) entry."""
    where = {s: i for i, s in enumerate(old_src) if s >= 0}
    return [where[s] if s >= 0 else -1 for s in new_src]


def _cut_linear(lin: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None) -> nn.Linear:
    """A new Linear holding `lin`'s rows (outputs) / columns (inputs) at the given positions (-1: zero)."""
    w = lin.weight.detach()
    if rows is not None:
        w = select(w, rows, 0)
    if cols is not None:
        w = select(w, cols, 1)
    out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device="meta", dtype=w.dtype)
    out.weight = nn.Parameter(w, requires_grad=False)
    if lin.bias is not None:
        b = lin.bias.detach()
        out.bias = nn.Parameter(select(b, rows, 0) if rows is not None else b.clone(), requires_grad=False)
    return out


class ShrinkingModel:
    """A family causal LM whose decoder layers shrink, step by step, to the structures not yet removed."""

    def __init__(self, model: nn.Module, shape: ModelShape, unit: str, channel_multiple: int = 1):
        if channel_multiple < 1:
            raise ValueError(f"channel_multiple must be >= 1, got {channel_multiple}")
        self.model, self.shape, self.unit, self.channel_multiple = model, shape, unit, channel_multiple
        full = LayerLayout(q_src=tuple(range(shape.num_heads)), kv_src=tuple(range(shape.num_kv_heads)),
                           channels=tuple(range(shape.intermediate)))
        self.layouts = [full] * shape.num_layers

    def cut(self, removed) -> None:
        """Shrink every layer to what is left once `removed` ((layer, kind, index), all removals so far) is gone."""
        s, g = self.shape, self.shape.group_size
        for layer, (q, channels) in enumerate(kept_structures(s, self.unit, removed)):
            kv = sorted({h // g for h in q})
            channels = list(channels)
            if len(channels) < s.intermediate:
                m = self.channel_multiple
                channels += [-1] * (min(-(-len(channels) // m) * m, s.intermediate) - len(channels))
            new = layer_layout(q, kv, channels, g)
            if new != self.layouts[layer]:
                self._reshape(layer, self.layouts[layer], new)
                self.layouts[layer] = new

    @torch.no_grad()
    def _reshape(self, layer: int, old: LayerLayout, new: LayerLayout) -> None:
        block = self.model.model.layers[layer]
        hd = self.shape.head_dim
        if (new.q_src, new.kv_src) != (old.q_src, old.kv_src):
            attn = block.self_attn
            if not new.q_src:
                if not isinstance(attn, EmptyAttention):
                    block.self_attn = EmptyAttention(attn.layer_idx, attn.o_proj.out_features,
                                                     attn.o_proj.bias is not None)
                    if attn.o_proj.bias is not None:
                        block.self_attn.o_proj.bias = nn.Parameter(attn.o_proj.bias.detach(), requires_grad=False)
            else:
                q_rows = head_rows(_positions(old.q_src, new.q_src), hd)
                kv_rows = head_rows(_positions(old.kv_src, new.kv_src), hd)
                attn.q_proj = _cut_linear(attn.q_proj, rows=q_rows)
                attn.k_proj = _cut_linear(attn.k_proj, rows=kv_rows)
                attn.v_proj = _cut_linear(attn.v_proj, rows=kv_rows)
                attn.o_proj = _cut_linear(attn.o_proj, cols=q_rows)
                attn.num_key_value_groups = len(new.q_src) // len(new.kv_src)
        if new.channels != old.channels:
            mlp = block.mlp
            if not new.channels:
                if not isinstance(mlp, EmptyMLP):
                    block.mlp = EmptyMLP(mlp.down_proj.out_features, mlp.down_proj.bias is not None)
                    if mlp.down_proj.bias is not None:
                        block.mlp.down_proj.bias = nn.Parameter(mlp.down_proj.bias.detach(), requires_grad=False)
            else:
                pos = _positions(old.channels, new.channels)
                mlp.gate_proj = _cut_linear(mlp.gate_proj, rows=pos)
                mlp.up_proj = _cut_linear(mlp.up_proj, rows=pos)
                mlp.down_proj = _cut_linear(mlp.down_proj, cols=pos)
                mlp.intermediate_size = len(new.channels)

    def weights(self, layers, with_kv: bool) -> dict[str, nn.Parameter]:
        """The compact weights whose gradients `scores` reads, keyed "layer.proj", for the given layers."""
        out = {}
        for layer in layers:
            block = self.model.model.layers[layer]
            if not isinstance(block.self_attn, EmptyAttention):
                for name in ATTN_PROJS if with_kv else ("q_proj", "o_proj"):
                    out[f"{layer}.{name}"] = getattr(block.self_attn, name).weight
            if not isinstance(block.mlp, EmptyMLP):
                for name in MLP_PROJS:
                    out[f"{layer}.{name}"] = getattr(block.mlp, name).weight
        return out

    @torch.no_grad()
    def scores(self, grads: dict[str, torch.Tensor], layers, with_kv: bool,
               fisher: dict[str, torch.Tensor] | None = None, score: str = "first"):
        """Σ `taylor_importance` (default |W ⊙ Ḡ|) per structure in the source numbering, [L, U] and [L, I]
        float64 on the CPU; 0 for a removed structure (as on the masked model, where its weights are zero) and
        for layers not listed."""
        s = self.shape
        units = units_per_layer(s, self.unit)
        heads = torch.zeros(s.num_layers, units, dtype=torch.float64)
        channels = torch.zeros(s.num_layers, s.intermediate, dtype=torch.float64)
        ws = self.weights(layers, with_kv)

        def per_weight(key):
            return taylor_importance(ws[key], grads[key], None if fisher is None else fisher[key], score)

        for layer in layers:
            lay = self.layouts[layer]
            if f"{layer}.q_proj" in ws:
                nkv = len(lay.kv_src)
                src = lay.kv_src if self.unit == "kv_group" else lay.q_src  # kv_group: whole groups, no dummies
                h = rows_per_unit(per_weight(f"{layer}.q_proj"), len(src)) + cols_per_unit(per_weight(f"{layer}.o_proj"), len(src))
                if with_kv:
                    kv = rows_per_unit(per_weight(f"{layer}.k_proj"), nkv) + rows_per_unit(per_weight(f"{layer}.v_proj"), nkv)
                    h = h + kv.repeat_interleave(len(src) // nkv)
                _scatter(heads[layer], src, h)
            if f"{layer}.gate_proj" in ws:
                n = len(lay.channels)
                c = (rows_per_unit(per_weight(f"{layer}.gate_proj"), n) + rows_per_unit(per_weight(f"{layer}.up_proj"), n)
                     + cols_per_unit(per_weight(f"{layer}.down_proj"), n))
                _scatter(channels[layer], lay.channels, c)
        return heads, channels


def _scatter(dest: torch.Tensor, src: tuple[int, ...], values: torch.Tensor) -> None:
    """dest[src[i]] = values[i] where src[i] >= 0 (dummies dropped), vectorised."""
    index = torch.as_tensor(src, dtype=torch.long)
    valid = index >= 0
    dest[index[valid]] = values.cpu()[valid]
