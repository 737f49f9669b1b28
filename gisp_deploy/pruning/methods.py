"""Pruning methods (gisp, oneshot, wanda-sp, magnitude, random): each turns a model into a Ranking."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from ..arguments import check_in_loop_refit, check_score
from ..data import Calibration
from ..families import ModelShape
from ..ranking import CHANNEL, HEAD, Ranking, RemovalCounter, build_ranking, check_unit, units_per_layer
from ..refit import DEFAULT_RIDGE
from .distributed import Ranks
from .objectives import AUTO_BATCH_CPU, LeadingCache, fit_batch_size, objective_sums, scored_weights
from .scoring import (NEEDS_FISHER, NORMALIZATIONS, gradient_scores, input_norms, magnitude_scores,
                      normalize, scores_kv, wanda_scores, zero_structure)
from .refitting import LoopRefit, refitted_layers
from .shrinking import ShrinkingModel

METHODS = ("gisp", "oneshot", "wanda-sp", "magnitude", "random")
SCHEDULES = ("params", "structures")
DEFAULT_NORMALIZATION = {"gisp": "reference", "oneshot": "reference", "magnitude": "params",
                         "wanda-sp": "none", "random": "none"}

PassProgress = Callable[[str, int], Callable[[int], None]]  # (description, total tokens) -> advance(n)


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the ranking; a resumed run must match it exactly."""

    method: str = "gisp"
    unit: str = "q_head"
    objective: str = "lm"
    steps: int = 20
    max_sparsity: float = 0.6
    schedule: str = "params"
    normalization: str | None = None  # None: the method's default
    score: str = "first"  # gradient methods: arguments.SCORES, the Taylor terms ranked by
    in_loop_refit: str = "none"  # gradient methods: "ls" refits consumers between steps (refitting.py)
    in_loop_ridge: float | None = None  # its ridge (refit.py); None: refit.DEFAULT_RIDGE when refitting
    protect_first: float = 0.1
    protect_last: int = 1
    seed: int = 0
    samples: int = 128
    seq_len: int = 256
    batch_size: int | None = None  # sequences per forward/backward; None: fitted to the device (objectives.py)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        check_unit(self.unit)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.normalization is None:
            object.__setattr__(self, "normalization", DEFAULT_NORMALIZATION[self.method])
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
        check_score(self.score, self.method, self.objective)
        check_in_loop_refit(self.in_loop_refit, self.method)
        if self.in_loop_refit == "none":
            object.__setattr__(self, "in_loop_ridge", None)
        elif self.in_loop_ridge is None:
            object.__setattr__(self, "in_loop_ridge", DEFAULT_RIDGE)
        elif not (math.isfinite(self.in_loop_ridge) and self.in_loop_ridge >= 0):
            raise ValueError(f"in_loop_ridge {self.in_loop_ridge} must be >= 0 (relative to the moments' diagonal)")
        if not (math.isfinite(self.max_sparsity) and 0 < self.max_sparsity < 1):
            raise ValueError(f"--max-sparsity {self.max_sparsity} must be a fraction in (0, 1), e.g. 0.6")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps} must be at least 1")
        if not 0 <= self.protect_first < 1 or self.protect_last < 0:
            raise ValueError("--protect-first is a fraction of layers in [0, 1); --protect-last a count >= 0")
        for name in ("samples", "seq_len", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")

    def protected_layers(self, num_layers: int) -> list[int]:
        first = set(range(int(self.protect_first * num_layers)))
        last = set(range(max(0, num_layers - self.protect_last), num_layers))
        return sorted(first | last)


COMPUTE_MODES = ("compact", "masked")


@dataclass(frozen=True)
class ComputeOptions:
    """How GISP's scoring passes run. None of it changes the ranking beyond floating-point rounding
    (identical in fp32 on the tests' models), so a resumed run may change it."""

    # compact: cut removed structures out between steps (shrinking.py) and start later passes after the leading
    # protected layers, from their outputs kept in memory (objectives.LeadingCache); masked: zero removed
    # structures and run every layer every pass (the straightforward way)
    compute: str = "compact"
    channel_multiple: int = 64  # compact: pad each layer's channels with zero ones to a multiple of this
    ranks: Ranks = Ranks()  # data parallel (distributed.py): this process scores its share of the sequences

    def __post_init__(self):
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"unknown compute mode {self.compute!r}; choose one of {', '.join(COMPUTE_MODES)}")
        if self.channel_multiple < 1:
            raise ValueError(f"channel_multiple must be >= 1, got {self.channel_multiple}")


class Removal(NamedTuple):
    """One structure a run removed: where it is, at which step, with which (normalised) score."""

    layer: int
    kind: int  # ranking.HEAD or ranking.CHANNEL
    index: int
    step: int
    score: float


@dataclass
class PruneState:
    """Progress of a run after its last completed step; enough to resume it exactly."""

    step: int = 0
    removed: list[Removal] = field(default_factory=list)
    last_heads: torch.Tensor | None = None  # [L, U] normalised scores of the latest scoring pass
    last_channels: torch.Tensor | None = None  # [L, I]


class Pool:
    """The prunable structures (outside protected layers) as parallel arrays."""

    def __init__(self, shape: ModelShape, unit: str, protected: list[int]):
        units = units_per_layer(shape, unit)
        layers = [l for l in range(shape.num_layers) if l not in set(protected)]
        rows = [(l, HEAD, i) for l in layers for i in range(units)]
        rows += [(l, CHANNEL, i) for l in layers for i in range(shape.intermediate)]
        arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        self.layer, self.kind, self.index = arr[:, 0], arr[:, 1], arr[:, 2]

    def __len__(self):
        return len(self.layer)

    def values(self, heads: torch.Tensor, channels: torch.Tensor) -> np.ndarray:
        h, c = heads.numpy(), channels.numpy()
        return np.where(self.kind == HEAD, h[self.layer, np.minimum(self.index, h.shape[1] - 1)],
                        c[self.layer, self.index])

    def ascending(self, values: np.ndarray) -> np.ndarray:
        """Pool positions by ascending value; ties broken by layer, kind, index (deterministic)."""
        return np.lexsort((self.index, self.kind, self.layer, values))


def pool_capacity(shape: ModelShape, unit: str, pool: Pool) -> int:
    counter = RemovalCounter(shape, unit)
    return sum(counter.remove(l, k, i) for l, k, i in zip(pool.layer, pool.kind, pool.index))


def all_scores(heads, channels) -> dict[tuple[int, int, int], float]:
    out = {}
    for l in range(heads.shape[0]):
        out.update({(l, HEAD, i): float(v) for i, v in enumerate(heads[l].tolist())})
        out.update({(l, CHANNEL, i): float(v) for i, v in enumerate(channels[l].tolist())})
    return out


class Remover:
    """Removes structures in a given order until a parameter target, zeroing them in the model."""

    def __init__(self, model, shape: ModelShape, unit: str, state: PruneState):
        self.model, self.shape, self.unit, self.state = model, shape, unit, state
        self.counter = RemovalCounter(shape, unit)
        self.removed_params = 0
        self.done: set[tuple[int, int, int]] = set()
        for r in state.removed:  # replay a resumed run's removals
            self._apply(r.layer, r.kind, r.index)

    def _apply(self, layer, kind, index):
        self.removed_params += self.counter.remove(layer, kind, index)
        self.done.add((layer, kind, index))
        if self.model is not None:
            g = self.shape.group_size
            kv_gone = kind == HEAD and self.unit == "q_head" and self.counter.heads_left[layer, index // g] == 0
            zero_structure(self.model, self.shape, self.unit, layer, kind, index, kv_gone=kv_gone)

    def run(self, pool: Pool, values: np.ndarray, target: float, step: int, max_count: int | None = None):
        count = 0
        for j in pool.ascending(values):
            if self.removed_params >= target or (max_count is not None and count >= max_count):
                break
            key = (int(pool.layer[j]), int(pool.kind[j]), int(pool.index[j]))
            if key in self.done:
                continue
            self._apply(*key)
            self.state.removed.append(Removal(*key, step, float(values[j])))
            count += 1


def prune(model: nn.Module, shape: ModelShape, calib: Calibration | None, cfg: PruneConfig,
          state: PruneState | None = None, on_step: Callable[[PruneState], None] | None = None,
          on_pass: PassProgress | None = None, compute: ComputeOptions = ComputeOptions()) -> Ranking:
    """Rank every structure of `model` with `cfg.method`. Iterative methods change `model` as they go: under
    compute="compact" (default) removed structures are cut out of its layers, under "masked" they are zeroed;
    `state` resumes a run and `on_step` is told after each completed step."""
    state = state or PruneState()
    protected = cfg.protected_layers(shape.num_layers)
    pool = Pool(shape, cfg.unit, protected)
    target = cfg.max_sparsity * shape.total_params
    capacity = pool_capacity(shape, cfg.unit, pool)
    if capacity < target:
        raise ValueError(
            f"--max-sparsity {cfg.max_sparsity} needs {target:.0f} parameters removed, but outside the protected "
            f"layers {protected} only {capacity} ({capacity / shape.total_params:.3f}) can be; lower --max-sparsity "
            "or protect fewer layers")
    if cfg.method in ("gisp", "oneshot"):
        return _gisp(model, shape, calib, cfg, state, pool, target, on_step, on_pass, compute)
    remover = Remover(None, shape, cfg.unit, state)
    if cfg.method == "random":
        gen = torch.Generator().manual_seed(cfg.seed)
        heads = torch.rand(shape.num_layers, units_per_layer(shape, cfg.unit), generator=gen, dtype=torch.float64)
        channels = torch.rand(shape.num_layers, shape.intermediate, generator=gen, dtype=torch.float64)
    elif cfg.method == "magnitude":
        heads, channels = normalize(*magnitude_scores(model, shape, cfg.unit), shape, cfg.unit, cfg.normalization)
    else:  # wanda-sp
        advance = on_pass("activation norms", calib.input_ids.numel()) if on_pass else None
        norms = input_norms(model, shape, calib, cfg.batch_size or AUTO_BATCH_CPU, advance)
        heads, channels = normalize(*wanda_scores(model, shape, cfg.unit, norms), shape, cfg.unit, cfg.normalization)
    values = pool.values(heads, channels)
    order_values = _layer_uniform_keys(pool, values) if cfg.method == "wanda-sp" else values
    remover.run(pool, order_values, target, step=1)
    # record the method's own score, not the ordering key
    lookup = {(int(l), int(k), int(i)): float(v) for l, k, i, v in zip(pool.layer, pool.kind, pool.index, values)}
    removed = [r._replace(score=lookup[r[:3]]) for r in state.removed]
    state.step = 1
    return build_ranking(shape, cfg.unit, removed, all_scores(heads, channels))


def _layer_uniform_keys(pool: Pool, values: np.ndarray) -> np.ndarray:
    """Wanda-sp prunes every layer by the same fraction: order by rank fraction within (layer, kind)."""
    keys = np.zeros(len(values))
    for layer in np.unique(pool.layer):
        for kind in (HEAD, CHANNEL):
            sel = np.nonzero((pool.layer == layer) & (pool.kind == kind))[0]
            ranks = np.argsort(np.argsort(values[sel], kind="stable"), kind="stable")
            keys[sel] = (ranks + 1) / len(sel)
    return keys


def _gisp(model, shape, calib, cfg, state, pool, target, on_step, on_pass, compute: ComputeOptions) -> Ranking:
    if calib is None:
        raise ValueError(f"method {cfg.method} needs calibration data")
    steps = 1 if cfg.method == "oneshot" else cfg.steps
    compact = compute.compute == "compact"
    protected = cfg.protected_layers(shape.num_layers)
    unprotected = [l for l in range(shape.num_layers) if l not in set(protected)]
    with_kv = scores_kv(shape, cfg.unit)
    per_step = math.ceil(cfg.max_sparsity * len(pool) / steps)
    batch_size = cfg.batch_size
    fisher = cfg.score in NEEDS_FISHER
    ranks = compute.ranks
    local = ranks.shard(calib)
    reduce = ranks.sum if ranks.world > 1 else None
    refit = None
    if cfg.in_loop_refit == "ls":  # on the dense model: before a resumed run's removals are replayed
        refit = LoopRefit(model, shape, cfg.unit, refitted_layers(shape, protected), cfg.in_loop_ridge)
        if batch_size is None:
            batch_size = fit_batch_size(model, scored_weights(model, shape, cfg.unit), local, fisher=fisher)
        advance = on_pass("dense input moments", local.input_ids.numel()) if on_pass else None
        refit.record(model, local, batch_size, advance, reduce)
    shrinking = ShrinkingModel(model, shape, cfg.unit, compute.channel_multiple) if compact else None
    remover = Remover(None if compact else model, shape, cfg.unit, state)
    leading = LeadingCache(next(l for l in range(shape.num_layers + 1) if l not in protected)) if compact else None

    def settle():
        """Cut what is removed out of the compact model, and refit its consumers (in-loop refit)."""
        if compact:
            shrinking.cut(remover.done)
        if refit is not None:
            refit.apply(model, remover.done, shrinking.layouts if compact else None)

    def scores(layers, description):
        nonlocal batch_size
        if compact:
            weights = shrinking.weights(layers, with_kv)
        else:
            weights = scored_weights(model, shape, cfg.unit, layers)
        if batch_size is None:
            batch_size = fit_batch_size(model, weights, local, fisher=fisher)
        advance = on_pass(description, local.input_ids.numel()) if on_pass else None
        sums = objective_sums(model, weights, local, batch_size, advance, leading, reduce, fisher=fisher)
        if compact:
            raw = shrinking.scores(sums.grad, layers, with_kv, sums.fisher, cfg.score)
        else:
            raw = gradient_scores(model, shape, cfg.unit, sums.grad, fisher=sums.fisher, score=cfg.score)
        return normalize(*raw, shape, cfg.unit, cfg.normalization)

    step = state.step
    while remover.removed_params < target:
        step += 1
        # Compact: protected layers are never removed, and their scores only order the ranking's uncovered tail,
        # which takes them from the last step; other steps skip their weight gradients (and the backward below
        # them). The last step is known in advance under the params schedule; otherwise they get a pass of their
        # own once a step has reached the target, on the model that step scored (cut only at the next step).
        known_last = cfg.schedule == "params" and step >= steps
        settle()
        label = f"step {step}/{steps}" if step <= steps else f"step {step} (past --steps {steps})"
        heads, channels = scores(range(shape.num_layers) if known_last or not compact else unprotected,
                                 f"{label} scoring")
        values = pool.values(heads, channels)
        if cfg.schedule == "params":
            step_target = target if step >= steps else target * step / steps
            remover.run(pool, values, step_target, step)
        else:
            remover.run(pool, values, target, step, max_count=per_step)
        if compact and not known_last and protected and remover.removed_params >= target:
            tail_heads, tail_channels = scores(protected, f"{label} protected layers")
            heads, channels = heads + tail_heads, channels + tail_channels  # disjoint layers, zero elsewhere
        if refit is not None:  # the model a step leaves behind is the corrected one
            settle()
        state.step, state.last_heads, state.last_channels = step, heads, channels
        if on_step is not None:
            on_step(state)
    if state.last_heads is None:
        raise ValueError("resumed state has no scores; delete the partial run and start again")
    return build_ranking(shape, cfg.unit, list(state.removed), all_scores(state.last_heads, state.last_channels))
