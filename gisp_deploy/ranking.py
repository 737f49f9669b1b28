"""The ranking: the total order in which structures were removed, and its prefix at a sparsity."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file  # numpy, not torch: serve's checks stay torch-free

from .arguments import SparsityError, parse_sparsities
from .families import ModelShape

META_KEY = "gisp_ranking"

HEAD, CHANNEL = 0, 1
UNITS = ("q_head", "kv_group")


def check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; choose one of {', '.join(UNITS)}")
    return unit


def units_per_layer(shape: ModelShape, unit: str) -> int:
    return shape.num_heads if unit == "q_head" else shape.num_kv_heads


def structure_params(shape: ModelShape, unit: str) -> tuple[int, int]:
    """Parameters of one attention unit (including its k/v when the unit owns them) and of one channel."""
    if unit == "kv_group":
        return shape.group_size * shape.q_head_params + shape.kv_head_params, shape.channel_params
    if shape.group_size == 1:
        return shape.q_head_params + shape.kv_head_params, shape.channel_params
    return shape.q_head_params, shape.channel_params


class RemovalCounter:
    """Counts the parameters each removal frees, given everything removed before it.

    Under query-head units a KV head is freed only with the last query head of its group,
    so the count of a head depends on the order; this class is the one place that knows it.
    """

    def __init__(self, shape: ModelShape, unit: str):
        self.shape, self.unit = shape, check_unit(unit)
        self.heads_left = np.full((shape.num_layers, shape.num_kv_heads), shape.group_size, dtype=np.int64)
        self.head_cost, self.channel_cost = structure_params(shape, unit)

    def remove(self, layer: int, kind: int, index: int) -> int:
        if kind == CHANNEL:
            return self.channel_cost
        if self.unit == "kv_group" or self.shape.group_size == 1:
            return self.head_cost
        group = index // self.shape.group_size
        self.heads_left[layer, group] -= 1
        return self.head_cost + (self.shape.kv_head_params if self.heads_left[layer, group] == 0 else 0)

    def costs(self, layer: np.ndarray, kind: np.ndarray, index: np.ndarray) -> np.ndarray:
        """What `remove` returns for each structure of a whole order, removed from nothing, vectorised."""
        out = np.where(kind == CHANNEL, self.channel_cost, self.head_cost).astype(np.int64)
        if self.unit == "q_head" and self.shape.group_size > 1:
            heads = np.nonzero(kind == HEAD)[0]
            group = layer[heads] * self.shape.num_kv_heads + index[heads] // self.shape.group_size
            _, last = np.unique(group[::-1], return_index=True)  # each group's last head frees its KV head
            out[heads[len(heads) - 1 - last]] += self.shape.kv_head_params
        return out

    def peek(self, layer: int, kind: int, index: int) -> int:
        if kind == HEAD and self.unit == "q_head" and self.shape.group_size > 1:
            group = index // self.shape.group_size
            return self.head_cost + (self.shape.kv_head_params if self.heads_left[layer, group] == 1 else 0)
        return self.head_cost if kind == HEAD else self.channel_cost


@dataclass(frozen=True)
class Ranking:
    """Structures in removal order: the first `num_covered` were removed by the run, the rest were not."""

    shape: ModelShape
    unit: str
    layer: np.ndarray  # [S] int
    kind: np.ndarray  # [S] HEAD or CHANNEL
    index: np.ndarray  # [S] head / KV-group / channel index within its layer
    step: np.ndarray  # [S] step of removal, -1 when not covered
    score: np.ndarray  # [S] normalised score when removed (final score when not covered)
    params: np.ndarray  # [S] parameters freed by this removal given all earlier ones
    num_covered: int

    def __post_init__(self):
        check_unit(self.unit)
        n = len(self.layer)
        per_layer = units_per_layer(self.shape, self.unit) + self.shape.intermediate
        if n != self.shape.num_layers * per_layer:
            raise ValueError(f"ranking has {n} structures, the model has {self.shape.num_layers * per_layer}")
        for name in ("kind", "index", "step", "score", "params"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ranking column {name!r} has {len(getattr(self, name))} entries, expected {n}")
        units = units_per_layer(self.shape, self.unit)
        bound = np.where(self.kind == HEAD, units, self.shape.intermediate)
        bad = np.nonzero((self.layer < 0) | (self.layer >= self.shape.num_layers) | ~np.isin(self.kind, (HEAD, CHANNEL))
                         | (self.index < 0) | (self.index >= bound))[0]
        if len(bad):
            j = int(bad[0])
            raise ValueError(f"entry {j} (layer {self.layer[j]}, kind {self.kind[j]}, index {self.index[j]}) is outside "
                             f"the model's {self.shape.num_layers} layers x {units} attention units / "
                             f"{self.shape.intermediate} channels")
        key = (self.layer.astype(np.int64) * 2 + self.kind) * (max(per_layer, 1) + 1) + self.index
        if n and np.bincount(key).max() > 1:  # key is bounded (checked above): O(n), not a sort
            raise ValueError("ranking lists some structure twice; the artifact is corrupt")
        if not 0 <= self.num_covered <= n:
            raise ValueError(f"num_covered={self.num_covered} outside [0, {n}]")

    def __len__(self) -> int:
        return len(self.layer)

    @property
    def cumulative_params(self) -> np.ndarray:
        return np.cumsum(self.params, dtype=np.int64)

    @property
    def coverage(self) -> float:
        """Largest sparsity this ranking can serve."""
        if self.num_covered == 0:
            return 0.0
        return float(self.cumulative_params[self.num_covered - 1]) / self.shape.total_params

    def prefix_length(self, sparsity: float) -> int:
        """Length of the shortest ranking prefix whose removed parameters reach `sparsity`."""
        (s,) = parse_sparsities(sparsity)
        if s > self.coverage + 1e-9:
            raise SparsityError(
                f"sparsity {s:g} is beyond what this artifact covers ({self.coverage:.4f}); "
                f"re-run `gisp-deploy prune` with --max-sparsity {s:g} or more"
            )
        if s == 0:
            return 0
        target = s * self.shape.total_params
        cum = self.cumulative_params[: self.num_covered]
        k = int(np.searchsorted(cum, target - 1e-6, side="left")) + 1
        return min(k, self.num_covered)

    def achieved_sparsity(self, prefix: int) -> float:
        return 0.0 if prefix == 0 else float(self.cumulative_params[prefix - 1]) / self.shape.total_params

    # ---- storage: columnar arrays in safetensors; metadata lives in the artifact manifest
    def save(self, path: Path) -> None:
        save_file({
            "layer": self.layer.astype(np.int16), "kind": self.kind.astype(np.uint8),
            "index": self.index.astype(np.int32), "step": self.step.astype(np.int16),
            "score": self.score.astype(np.float32), "params": self.params.astype(np.int32),
        }, str(path), metadata={META_KEY: json.dumps({"num_covered": self.num_covered, "unit": self.unit},
                                                     sort_keys=True)})  # one key: safetensors orders keys randomly

    @classmethod
    def load(cls, path: Path, shape: ModelShape) -> "Ranking":
        t = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
        if META_KEY in meta:  # earlier files keep num_covered and unit as two keys of their own
            meta = json.loads(meta[META_KEY])
        missing = {"layer", "kind", "index", "step", "score", "params"} - set(t)
        if missing or "num_covered" not in meta or "unit" not in meta:
            raise ValueError(f"{path}: not a gisp-deploy ranking (missing {sorted(missing) or 'metadata'})")
        ranking = cls(
            shape=shape, unit=meta["unit"],
            layer=t["layer"].astype(np.int64), kind=t["kind"].astype(np.int64),
            index=t["index"].astype(np.int64), step=t["step"].astype(np.int64),
            score=t["score"].astype(np.float64), params=t["params"].astype(np.int64),
            num_covered=int(meta["num_covered"]),
        )
        want = RemovalCounter(shape, ranking.unit).costs(ranking.layer, ranking.kind, ranking.index)
        wrong = np.nonzero(want != ranking.params)[0]
        if len(wrong):  # the achieved sparsity of every slice is summed from this column
            j = int(wrong[0])
            raise ValueError(f"entry {j} says it frees {ranking.params[j]} parameters, the model's shapes say "
                             f"{want[j]}: the params column does not match the model")
        return ranking


def build_ranking(shape: ModelShape, unit: str, removed: list[tuple[int, int, int, int, float]],
                  final_scores: dict[tuple[int, int, int], float]) -> Ranking:
    """Assemble a Ranking from (layer, kind, index, step, score) removals in order, plus final
    scores for every structure; those never removed follow, lowest final score first."""
    seen = {(l, k, i) for l, k, i, _, _ in removed}
    rest = sorted((s, key) for key, s in final_scores.items() if key not in seen)
    rows = list(removed) + [(l, k, i, -1, s) for s, (l, k, i) in rest]
    counter = RemovalCounter(shape, unit)
    params = [counter.remove(l, k, i) for l, k, i, _, _ in rows]
    cols = list(zip(*rows)) if rows else [[]] * 5
    return Ranking(
        shape=shape, unit=unit,
        layer=np.asarray(cols[0], dtype=np.int64), kind=np.asarray(cols[1], dtype=np.int64),
        index=np.asarray(cols[2], dtype=np.int64), step=np.asarray(cols[3], dtype=np.int64),
        score=np.asarray(cols[4], dtype=np.float64), params=np.asarray(params, dtype=np.int64),
        num_covered=len(removed),
    )
