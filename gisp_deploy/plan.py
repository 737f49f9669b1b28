"""The frozen per-layer slice plan: which heads, KV heads and channels each layer keeps."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .families import ModelShape
from .ranking import CHANNEL, Ranking


@dataclass(frozen=True)
class LayerPlan:
    q_heads: tuple[int, ...]  # kept query heads, original numbering, sorted
    kv_heads: tuple[int, ...]  # kept KV heads (a KV head stays while any of its query heads does)
    channels: tuple[int, ...]  # kept MLP channels


def kept_params(s: ModelShape, layers) -> int:
    """Decoder linear-layer parameters that a slice keeps (the sparsity's numerator complement)."""
    fixed = (s.hidden if s.o_bias else 0) + (s.hidden if s.mlp_bias else 0)
    return sum(len(lp.q_heads) * s.q_head_params + len(lp.kv_heads) * s.kv_head_params
               + len(lp.channels) * s.channel_params + fixed for lp in layers)


@dataclass(frozen=True)
class SlicePlan:
    shape: ModelShape
    unit: str
    sparsity: float  # requested
    achieved_sparsity: float
    prefix: int  # number of ranking entries removed (before deployment rounding)
    layers: tuple[LayerPlan, ...]
    tp_size: int = 1
    channel_multiple: int = 1

    def __post_init__(self):
        shape = self.shape
        if len(self.layers) != shape.num_layers:
            raise ValueError(f"plan has {len(self.layers)} layers, model has {shape.num_layers}")
        for i, lp in enumerate(self.layers):
            for name, idx, bound in (("q_heads", lp.q_heads, shape.num_heads),
                                     ("kv_heads", lp.kv_heads, shape.num_kv_heads),
                                     ("channels", lp.channels, shape.intermediate)):
                if list(idx) != sorted(set(idx)) or (idx and not 0 <= idx[0] <= idx[-1] < bound):
                    raise ValueError(f"layer {i}: {name} must be sorted unique indices in [0, {bound})")
            needed = sorted({h // shape.group_size for h in lp.q_heads})
            if list(lp.kv_heads) != needed:
                raise ValueError(f"layer {i}: kv_heads {lp.kv_heads} do not match the kept query heads' groups {needed}")

    @property
    def kept_params(self) -> int:
        return kept_params(self.shape, self.layers)

    def to_json(self) -> dict:
        return {"sparsity": self.sparsity, "achieved_sparsity": round(self.achieved_sparsity, 6),
                "tp_size": self.tp_size, "channel_multiple": self.channel_multiple,
                "layers": [{"layer": i, "q_heads": list(lp.q_heads), "kv_heads": list(lp.kv_heads),
                            "channels": list(lp.channels)} for i, lp in enumerate(self.layers)]}


class RoundingError(ValueError):
    pass


def _layer_orders(ranking: Ranking):
    """Per layer, heads (or KV groups) and channels from most to least important: never removed first,
    then the latest removed. Keeping a prefix of these orders keeps slices nested."""
    L = ranking.shape.num_layers
    heads: list[list[int]] = [[] for _ in range(L)]
    channels: list[list[int]] = [[] for _ in range(L)]
    for layer, kind, index in zip(ranking.layer[::-1].tolist(), ranking.kind[::-1].tolist(),
                                  ranking.index[::-1].tolist()):
        (channels if kind == CHANNEL else heads)[layer].append(index)
    return heads, channels


def _heads_ok(q_heads: list[int], shape: ModelShape, tp: int) -> bool:
    """Whether a layer's kept query heads can be split over `tp` ranks: query heads (after padding every
    KV group to the layer's largest) divisible by tp; KV heads divisible by tp or dividing it."""
    if not q_heads or tp == 1:
        return True
    kv = len({h // shape.group_size for h in q_heads})
    return padded_query_heads(q_heads, shape.group_size) % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def padded_query_heads(q_heads, group_size: int) -> int:
    """Query heads a compact layer holds for these kept ones: every kept KV group padded with zero heads to the
    layer's largest (what modeling.layer_layout builds, counted without torch; a test compares the two)."""
    groups = Counter(h // group_size for h in q_heads)
    return len(groups) * max(groups.values(), default=0)


def _round_layer(order: list[int], kept: int, ok) -> int:
    """Smallest count >= kept whose top-`count` prefix of `order` satisfies `ok` (monotone in kept)."""
    for count in range(kept, len(order) + 1):
        if ok(order[:count]):
            return count
    return -1


def plan_slice(ranking: Ranking, sparsity: float, *, tp_size: int = 1, channel_multiple: int = 1) -> SlicePlan:
    """The slice at `sparsity`: everything outside the shortest ranking prefix that reaches it.

    With `tp_size` / `channel_multiple` > 1, each layer keeps more of its own top-ranked structures until
    its widths can be split over `tp_size` ranks and its channel count is a multiple of `channel_multiple`
    (deployment rounding); slices stay nested and the achieved sparsity reports what is really removed."""
    for name, value in (("tp_size", tp_size), ("channel_multiple", channel_multiple)):
        if not isinstance(value, int) or value < 1:
            raise RoundingError(f"{name} must be a positive integer, got {value!r}")
    plan = _plan_prefix(ranking, sparsity)
    if tp_size == 1 and channel_multiple == 1:
        return plan
    shape, g = ranking.shape, ranking.shape.group_size
    head_orders, channel_orders = _layer_orders(ranking)
    layers = []
    for i, lp in enumerate(plan.layers):
        if ranking.unit == "kv_group":
            expand = lambda groups: [h for grp in groups for h in range(grp * g, (grp + 1) * g)]  # noqa: E731
            n = _round_layer(head_orders[i], len(lp.kv_heads), lambda pre: _heads_ok(expand(pre), shape, tp_size))
            q = sorted(expand(head_orders[i][:n])) if n >= 0 else []
        else:
            n = _round_layer(head_orders[i], len(lp.q_heads), lambda pre: _heads_ok(pre, shape, tp_size))
            q = sorted(head_orders[i][:n]) if n >= 0 else []
        if n < 0:
            raise RoundingError(
                f"layer {i}: no number of its {shape.num_heads} query heads ({shape.num_kv_heads} KV heads) at or "
                f"above the {len(lp.q_heads)} kept splits over tensor-parallel size {tp_size}; use a tp size that "
                f"divides the model's heads")
        step = math.lcm(channel_multiple, tp_size)
        c = -(-len(lp.channels) // step) * step
        if c > shape.intermediate:  # the full width is always deployable when it splits over the ranks
            c = shape.intermediate if shape.intermediate % tp_size == 0 else -1
        if c < 0:
            raise RoundingError(
                f"layer {i}: {len(lp.channels)} kept channels cannot be rounded to a multiple of {step} within its "
                f"{shape.intermediate} channels, and {shape.intermediate} does not divide by tensor-parallel size "
                f"{tp_size}; choose a --channel-multiple / --tp-size that divides {shape.intermediate}")
        c_order = channel_orders[i]
        layers.append(LayerPlan(q_heads=tuple(q), kv_heads=tuple(sorted({h // g for h in q})),
                                channels=tuple(sorted(c_order[:c]))))
    return SlicePlan(shape=shape, unit=ranking.unit, sparsity=plan.sparsity,
                     achieved_sparsity=1 - kept_params(shape, layers) / shape.total_params, prefix=plan.prefix,
                     layers=tuple(layers), tp_size=tp_size, channel_multiple=channel_multiple)


def kept_structures(shape: ModelShape, unit: str, removed) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per layer, the (query heads, channels) left once `removed` ((layer, kind, index) triples) are gone; a
    KV-group unit takes all of its query heads."""
    g = shape.group_size
    heads = np.ones((shape.num_layers, shape.num_heads), dtype=bool)  # [L, H] still there
    channels = np.ones((shape.num_layers, shape.intermediate), dtype=bool)  # [L, I]
    rows = removed if isinstance(removed, np.ndarray) else [tuple(map(int, r)) for r in removed]
    layer, kind, index = np.asarray(rows, dtype=np.int64).reshape(-1, 3).T  # [P] each
    gone = kind == CHANNEL
    channels[layer[gone], index[gone]] = False
    for j in range(g if unit == "kv_group" else 1):  # a KV group takes its g query heads
        heads[layer[~gone], index[~gone] * (g if unit == "kv_group" else 1) + j] = False
    return [(tuple(np.flatnonzero(heads[i]).tolist()), tuple(np.flatnonzero(channels[i]).tolist()))
            for i in range(shape.num_layers)]


def _plan_prefix(ranking: Ranking, sparsity: float) -> SlicePlan:
    """The slice at `sparsity`: everything outside the shortest ranking prefix that reaches it."""
    shape = ranking.shape
    prefix = ranking.prefix_length(sparsity)
    removed = np.stack([ranking.layer[:prefix], ranking.kind[:prefix], ranking.index[:prefix]], axis=1)  # [P, 3]
    layers = tuple(LayerPlan(q_heads=q, kv_heads=tuple(sorted({h // shape.group_size for h in q})), channels=c)
                   for q, c in kept_structures(shape, ranking.unit, removed))
    return SlicePlan(shape=shape, unit=ranking.unit, sparsity=float(sparsity),
                     achieved_sparsity=ranking.achieved_sparsity(prefix), prefix=prefix, layers=layers)
