"""The frozen per-layer slice plan: which heads, KV heads and channels each layer keeps."""

from __future__ import annotations

from dataclasses import dataclass

from .families import ModelShape
from .ranking import CHANNEL, HEAD, Ranking


@dataclass(frozen=True)
class LayerPlan:
    q_heads: tuple[int, ...]  # kept query heads, original numbering, sorted
    kv_heads: tuple[int, ...]  # kept KV heads (a KV head stays while any of its query heads does)
    channels: tuple[int, ...]  # kept MLP channels


@dataclass(frozen=True)
class SlicePlan:
    shape: ModelShape
    unit: str
    sparsity: float  # requested
    achieved_sparsity: float
    prefix: int  # number of ranking entries removed
    layers: tuple[LayerPlan, ...]

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
        s = self.shape
        fixed = (s.hidden if s.o_bias else 0) + (s.hidden if s.mlp_bias else 0)
        return sum(len(lp.q_heads) * s.q_head_params + len(lp.kv_heads) * s.kv_head_params
                   + len(lp.channels) * s.channel_params + fixed for lp in self.layers)

    def to_json(self) -> dict:
        return {"sparsity": self.sparsity, "achieved_sparsity": round(self.achieved_sparsity, 6),
                "layers": [{"layer": i, "q_heads": list(lp.q_heads), "kv_heads": list(lp.kv_heads),
                            "channels": list(lp.channels)} for i, lp in enumerate(self.layers)]}


def plan_slice(ranking: Ranking, sparsity: float) -> SlicePlan:
    """The slice at `sparsity`: everything outside the shortest ranking prefix that reaches it."""
    shape = ranking.shape
    prefix = ranking.prefix_length(sparsity)
    removed_heads = [set() for _ in range(shape.num_layers)]
    removed_channels = [set() for _ in range(shape.num_layers)]
    g = shape.group_size
    for layer, kind, index in zip(ranking.layer[:prefix], ranking.kind[:prefix], ranking.index[:prefix]):
        if kind == CHANNEL:
            removed_channels[layer].add(int(index))
        elif ranking.unit == "kv_group":
            removed_heads[layer].update(range(int(index) * g, (int(index) + 1) * g))
        else:
            removed_heads[layer].add(int(index))
    layers = []
    for i in range(shape.num_layers):
        q = tuple(h for h in range(shape.num_heads) if h not in removed_heads[i])
        layers.append(LayerPlan(
            q_heads=q,
            kv_heads=tuple(sorted({h // g for h in q})),
            channels=tuple(c for c in range(shape.intermediate) if c not in removed_channels[i]),
        ))
    return SlicePlan(shape=shape, unit=ranking.unit, sparsity=float(sparsity),
                     achieved_sparsity=ranking.achieved_sparsity(prefix), prefix=prefix, layers=tuple(layers))
