"""Deploy by budget: what a slice costs (parameters, weight and KV-cache bytes, the bytes a decode step reads) and
the largest slice that fits a memory / parameter budget, or the least pruned one that reaches a speed-up."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .arguments import (DEFAULT_RESERVE, DTYPE_NAMES, FP8_KV_CACHE_DTYPES, check_one_size, dtype_bytes, parse_bytes,
                        parse_count, parse_reserve)
from .plan import SlicePlan, plan_slice
from .ranking import Ranking
from .speed_table import SpeedTable, check_same_artifact, read_speed_table

GRID = 0.1  # the round sparsities shown next to the chosen slice


def kv_cache_elements(kv_heads, head_dim: int) -> int:
    """K and V elements one token adds to the cache: 2 x head_dim per KV head, over layers that each keep their
    own number of KV heads (`kv_heads`, one count per layer; a layer without attention caches nothing)."""
    return 2 * head_dim * sum(kv_heads)


def rank_kv_heads(kv: int, tp_size: int) -> int:
    """KV heads one tensor-parallel rank caches: its share when they split, one replica when fewer than ranks
    (vLLM's rule; deployment rounding makes kv divide tp or tp divide kv)."""
    return kv // tp_size if kv >= tp_size else min(kv, 1)


VOCAB_PADDING = 64  # vLLM pads embedding and lm_head rows to a multiple of this (DEFAULT_VOCAB_PADDING_SIZE)
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # rows (and biases) split over ranks
ROW_PARALLEL = ("o_proj", "down_proj")  # columns split; the bias, added after the all-reduce, on every rank
VOCAB_PARALLEL = ("embed_tokens", "lm_head")  # padded rows split


@dataclass(frozen=True)
class ModelSize:
    parameters: int  # of the compact model, all ranks together, a tied embedding once
    rank_elements: int  # held by each tensor-parallel rank in vLLM: its shards, the replicated tensors, padding
    rank_embedding_elements: int  # of those, the input embedding's (a decode step reads one row of it per token)


def model_size(config, plan: SlicePlan) -> ModelSize:
    """The compact model of `plan`, built on the meta device (nothing allocated), counted as vLLM lays it out on
    each of plan.tp_size ranks: column-parallel layers split their rows (a layer's KV heads as rank_kv_heads
    says), row-parallel ones their columns, embedding and lm_head their rows padded to VOCAB_PADDING; norms and
    row-parallel biases are replicated."""
    from .modeling import build_model, compact_config  # transformers' model code: only where counted

    tp, head_dim = plan.tp_size, plan.shape.head_dim
    tied = getattr(config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config,
                   "tie_word_embeddings", False)
    total = per_rank = embedding = 0
    for name, p in build_model(compact_config(config, plan)).named_parameters():  # a tied lm_head: not again
        module, kind = name.split(".")[-2:]
        n = p.numel()
        if module in VOCAB_PARALLEL:
            rows = -(-p.shape[0] // VOCAB_PADDING) * VOCAB_PADDING
            share = -(-rows // tp) * p.shape[1]
            embedding += share if module == "embed_tokens" and not tied else 0
        elif module in ("k_proj", "v_proj"):
            kv = p.shape[0] // head_dim
            share = n // kv * rank_kv_heads(kv, tp)
        elif module in COLUMN_PARALLEL or (module in ROW_PARALLEL and kind == "weight"):
            share = -(-n // tp)
        else:  # norms, q/k norms, row-parallel biases, the bias left of a removed block
            share = n
        total, per_rank = total + n, per_rank + share
    return ModelSize(parameters=total, rank_elements=per_rank, rank_embedding_elements=embedding)


def model_parameters(config, plan: SlicePlan) -> int:
    """Parameters of the compact model of `plan`: embeddings, norms and the padding query heads included, a
    tied embedding once."""
    return model_size(config, plan).parameters


def decode_bytes(weight_read_bytes: int, kv_bytes_per_token: int, batch: int, context: float) -> float:
    """Bytes one decode step reads: every weight once, and each sequence's KV cache (the ideal speed-up of a
    memory-bound decoder is the dense model's ÷ the slice's)."""
    return weight_read_bytes + batch * context * kv_bytes_per_token


def weight_read_params(parameters: int, config) -> int:
    """Parameters a decode step reads: all but the input embedding table (one row per token), unless tied to
    the output projection, which reads it whole."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "tie_word_embeddings", False):
        return parameters
    return parameters - text.vocab_size * text.hidden_size


def ideal_speedup(dense: "SliceCost", c: "SliceCost", batch: int, context: float) -> float:
    """The bytes-read bound on a slice's decode speed-up over dense: `batch` sequences of `context` tokens."""
    return (decode_bytes(dense.weight_read_bytes, dense.kv_bytes_per_token, batch, context)
            / decode_bytes(c.weight_read_bytes, c.kv_bytes_per_token, batch, context))


def weight_dtype(dtype, config) -> str:
    """A dtype name; `auto`: the source checkpoint's (config.dtype), float32 when it records none."""
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    name = str(dtype).removeprefix("torch.")
    return DTYPE_NAMES.get(name, name)


def kv_dtype_bytes(kv_cache_dtype, weights: str) -> int:
    """Bytes per cached element: the weights' dtype unless vLLM's --kv-cache-dtype says otherwise (fp8: one)."""
    if kv_cache_dtype in FP8_KV_CACHE_DTYPES:
        return 1
    return dtype_bytes(weights if kv_cache_dtype in (None, "auto") else DTYPE_NAMES.get(kv_cache_dtype, kv_cache_dtype))


@dataclass(frozen=True)
class SliceCost:
    """What serving one slice takes on each GPU (each tensor-parallel rank); parameters are all ranks' together."""

    sparsity: float  # give it as --sparsity (same --tp-size / --channel-multiple) to serve exactly this slice
    achieved_sparsity: float
    parameters: int  # of the compact model: embeddings, norms and padding heads included (all ranks)
    weight_bytes: int  # on each rank, as vLLM holds them: shards, replicated norms and biases, vocab padding
    weight_read_bytes: int  # of weight_bytes, what a decode step reads: all but an untied input embedding
    kv_bytes_per_token: int  # every layer's own KV heads (a rank's share) x head_dim x 2 (K, V) x KV dtype bytes
    kv_bytes: int  # kv_bytes_per_token x max_model_len x max_num_seqs

    @property
    def memory(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def to_json(self) -> dict:
        return {**asdict(self), "memory_bytes": self.memory}


def slice_cost(config, plan: SlicePlan, *, dtype="auto", kv_cache_dtype=None, tokens: int = 0,
               size: ModelSize | None = None) -> SliceCost:
    """The cost of serving `plan` in `dtype` with a KV cache of `tokens` tokens (`size`: already counted)."""
    weights = weight_dtype(dtype, config)
    size = size or model_size(config, plan)
    kv = kv_cache_elements([rank_kv_heads(len(lp.kv_heads), plan.tp_size) for lp in plan.layers],
                           plan.shape.head_dim) * kv_dtype_bytes(kv_cache_dtype, weights)
    nbytes = dtype_bytes(weights)
    return SliceCost(sparsity=plan.sparsity, achieved_sparsity=plan.achieved_sparsity, parameters=size.parameters,
                     weight_bytes=size.rank_elements * nbytes,
                     weight_read_bytes=(size.rank_elements - size.rank_embedding_elements) * nbytes,
                     kv_bytes_per_token=kv, kv_bytes=kv * tokens)


def prefix_sparsity(ranking: Ranking, prefix: int) -> float:
    """The shortest decimal sparsity whose slice removes exactly the first `prefix` ranking entries."""
    if prefix == 0:
        return 0.0
    low, high = ranking.achieved_sparsity(prefix - 1), ranking.achieved_sparsity(prefix)
    for digits in range(1, 16):  # every removal frees parameters, so (low, high] holds a decimal
        s = round(math.floor(high * 10**digits) / 10**digits, digits)
        if s > low and ranking.prefix_length(s) == prefix:
            return s
    return high


@dataclass(frozen=True)
class Reserve:
    """Memory a budget holds back from weights and KV cache: a share of the budget (what vLLM's
    --gpu-memory-utilization leaves, allocator fragmentation) plus a fixed size (CUDA context, activations of
    the largest forward pass, CUDA graphs)."""

    fraction: float = 0.05
    fixed: int = 512 * 2**20

    @classmethod
    def parse(cls, text) -> "Reserve":
        return text if isinstance(text, Reserve) else cls(*parse_reserve(text))

    def of(self, memory: int) -> int:
        return self.fixed + math.ceil(self.fraction * memory)

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}% + {format_bytes(self.fixed)}"


@dataclass(frozen=True)
class Candidate:
    cost: SliceCost
    fits: bool
    role: str  # "chosen", "next larger" (one removal fewer: over budget), "dense", or "" (a round sparsity)
    ideal_speedup: float  # bytes read, at the search's batch size and context
    measured_speedup: float | None  # from --speed-table, interpolated; None without one or outside its range
    perplexity: dict  # 'text@seq_len' -> held-out perplexity measured on exactly this slice (--speed-table)

    def to_json(self) -> dict:
        return {**self.cost.to_json(), "fits": self.fits, "role": self.role, "ideal_speedup": self.ideal_speedup,
                "measured_speedup": self.measured_speedup, "perplexity": self.perplexity}


@dataclass(frozen=True)
class FitResult:
    plan: SlicePlan  # the chosen slice, rounded as it is served
    cost: SliceCost
    binding: str  # what the next larger slice breaks: "memory", "parameters", "speed-up" (and-joined), or "none"
    headroom: dict  # per budget given: what is left once the chosen slice is in (bytes per GPU; parameters;
    #                 speed-up beyond the target)
    candidates: tuple[Candidate, ...]  # in sparsity order
    dense_kv_bytes_per_token: int
    settings: dict  # the budget and deployment settings the search used, and the speed source
    speedup: float | None  # the chosen slice's, from the speed source (None: outside the measured slices)
    warnings: tuple[str, ...] = ()  # about the speed table: its own records' warnings, another artifact's path

    @property
    def speed_source(self) -> str:
        return self.settings["speed_source"]

    def to_json(self) -> dict:
        return {"sparsity": self.cost.sparsity, "achieved_sparsity": round(self.cost.achieved_sparsity, 6),
                "cost": self.cost.to_json(), "speedup": self.speedup, "speed_source": self.speed_source,
                "binding": self.binding, "headroom": self.headroom,
                "dense_kv_bytes_per_token": self.dense_kv_bytes_per_token, "settings": self.settings,
                "warnings": list(self.warnings), "candidates": [c.to_json() for c in self.candidates]}


def fit(artifact, *, config=None, memory=None, params=None, speedup=None, batch_size: int = 1, speed_table=None,
        max_model_len: int | None = None, max_num_seqs: int = 1, dtype="auto", kv_cache_dtype=None,
        reserve=DEFAULT_RESERVE, tp_size: int = 1, channel_multiple: int = 1, verify: bool = True) -> FitResult:
    """The largest slice of `artifact` (an Artifact, its path, or a Ranking with `config`) that fits a budget:
    `memory` per GPU (weights + KV cache for max_model_len x max_num_seqs tokens + `reserve`), `params` (sizes
    may be strings: '24GiB', '5B') and / or a decode `speedup` over dense at `batch_size` sequences: ideal (bytes
    read, each sequence at max_model_len tokens, or at the table's mean context) or, with `speed_table` (a bench
    results.json or a SpeedTable), measured, interpolated between measured slices. Deployment rounding is applied to every candidate, so the
    slice reported is the one served with the same tp_size / channel_multiple."""
    ranking, config, art = _ranking_and_config(artifact, config, verify)
    memory = parse_bytes(memory) if isinstance(memory, str) else memory
    params = parse_count(params) if isinstance(params, str) else params
    if memory is None and params is None and speedup is None:
        raise ValueError("no budget given: pass --fit-memory (e.g. 24GiB), --fit-params (e.g. 5B) and / or "
                         "--fit-speedup (e.g. 1.5)")
    reserve = Reserve.parse(reserve)
    reserved = reserve.of(memory) if memory is not None else 0
    max_model_len = max_model_len or config.max_position_embeddings
    tokens = max_model_len * max_num_seqs
    table = _speed_table(speed_table, batch_size, art, ranking)
    context = table.context if table else max_model_len  # the ideal bounds what the table measured
    counted: dict = {}  # plan layers -> ModelSize (rounding maps many prefixes to one plan)

    def cost(prefix: int) -> tuple[SlicePlan, SliceCost]:
        plan = plan_slice(ranking, prefix_sparsity(ranking, prefix), tp_size=tp_size, channel_multiple=channel_multiple)
        if plan.layers not in counted:
            counted[plan.layers] = model_size(config, plan)
        return plan, slice_cost(config, plan, dtype=dtype, kv_cache_dtype=kv_cache_dtype, tokens=tokens,
                                size=counted[plan.layers])

    dense = cost(0)[1]

    def ideal(c: SliceCost) -> float:
        return ideal_speedup(dense, c, batch_size, context)

    def speed(c: SliceCost) -> float | None:
        return table.at(c.achieved_sparsity) if table else ideal(c)

    def broken(c: SliceCost) -> list[str]:  # every constraint here only eases as the prefix grows
        return [name for name, ok in (("memory", memory is None or c.memory + reserved <= memory),
                                      ("parameters", params is None or c.parameters <= params),
                                      ("speed-up", speedup is None or table is not None or ideal(c) >= speedup))
                if not ok]

    def slow(c: SliceCost) -> list[str]:  # a measured curve may fall between slices: checked on its own
        fast = speedup is None or table is None or (speed(c) or 0) >= speedup
        return broken(c) + ([] if fast else ["speed-up"])

    # Slices are nested and rounding only adds back a layer's own top-ranked structures, so every cost is
    # non-increasing (and the ideal speed-up non-decreasing) in the prefix length: the first prefix that fits
    # is the largest slice that does.
    most_pruned = cost(ranking.num_covered)[1]
    if broken(most_pruned):
        raise ValueError(_impossible(most_pruned, broken(most_pruned), memory, params, reserved,
                                     (speedup, ideal(most_pruned), batch_size)))
    low = _first_prefix(lambda p: not broken(cost(p)[1]), 0, ranking.num_covered)
    if table is not None and speedup is not None:
        low = _first_measured(table, speedup, low, ranking, lambda p: cost(p)[1])
    plan, chosen = cost(low)
    binding = " and ".join(slow(cost(low - 1)[1])) if low else "none"
    headroom = {**({"memory": memory - reserved - chosen.memory} if memory is not None else {}),
                **({"parameters": params - chosen.parameters} if params is not None else {}),
                **({"speed-up": speed(chosen) - speedup} if speedup is not None else {})}
    candidates = [Candidate(c, not slow(c), role, ideal(c), table.at(c.achieved_sparsity) if table else None,
                            table.perplexity_at(c.achieved_sparsity) if table else {})
                  for c, role in _neighbours(ranking, low, cost)]
    settings = {"memory": memory, "params": params, "speedup": speedup, "batch_size": batch_size,
                "speed_context": context, "speed_source": table.source if table else IDEAL_SOURCE,
                "reserve": str(reserve), "reserve_bytes": reserved,
                "max_model_len": max_model_len, "max_num_seqs": max_num_seqs, "dtype": weight_dtype(dtype, config),
                "kv_cache_dtype": kv_cache_dtype or "auto", "tp_size": tp_size, "channel_multiple": channel_multiple,
                "unit": ranking.unit, "coverage": round(ranking.coverage, 6)}
    return FitResult(plan=plan, cost=chosen, binding=binding, headroom=headroom, candidates=tuple(candidates),
                     dense_kv_bytes_per_token=dense.kv_bytes_per_token, settings=settings, speedup=speed(chosen),
                     warnings=_table_warnings(table, art))


IDEAL_SOURCE = "ideal (bytes read)"


def _first_prefix(ok, low: int, high: int) -> int:
    """The first prefix in [low, high] where `ok` holds, `ok` being false then true along it (ok(high) holds)."""
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if not ok(mid) else (low, mid)
    return low


def _first_measured(table: SpeedTable, target: float, low: int, ranking: Ranking, cost) -> int:
    """The first prefix from `low` whose measured (interpolated) speed-up reaches `target`: the first one whose
    achieved sparsity lies in an interval of the measured curve at or above it."""
    last = ranking.num_covered
    for lo, hi in table.reaching(target):
        if cost(last).achieved_sparsity < lo:
            break
        p = _first_prefix(lambda q: cost(q).achieved_sparsity >= lo, low, last)
        if cost(p).achieved_sparsity <= hi and (table.at(cost(p).achieved_sparsity) or 0) >= target:
            return p
    first, last_pt = table.measured_range
    best = max(pt.speedup for pt in table.points)
    beyond = [round(GRID * k, 1) for k in range(1, 10) if last_pt < round(GRID * k, 1) <= ranking.coverage + 1e-9]
    more = ",".join(f"{s:g}" for s in beyond[:3]) or "<larger sparsities>"
    raise ValueError(f"--fit-speedup {target:g}: the speed-ups measured at batch {table.batch_size} ({table.path}) "
                     f"reach {best:.3f} at most over the measured sparsities {first:.4f}-{last_pt:.4f} of the "
                     f"slices this artifact covers; measured speed-ups are never extrapolated: lower --fit-speedup "
                     f"or measure more pruned slices: gisp-deploy bench ARTIFACT --speed --batch-sizes "
                     f"{table.batch_size} --sparsities {more}")


def _speed_table(speed_table, batch_size: int, art, ranking: Ranking) -> SpeedTable | None:
    if speed_table is None:
        return None
    path = art.path if art is not None else None
    table = speed_table if isinstance(speed_table, SpeedTable) else read_speed_table(speed_table, batch_size, path)
    if table.batch_size != batch_size:
        raise ValueError(f"--speed-table {table.path} was read at batch {table.batch_size}, not --batch-size "
                         f"{batch_size}: read it again at {batch_size}")
    check_same_artifact(table, ranking, art.digest if art is not None else None)
    return table


def _table_warnings(table: SpeedTable | None, art) -> tuple[str, ...]:
    if table is None:
        return ()
    moved = art is not None and Path(table.artifact).resolve() != Path(art.path).resolve()
    if not moved or table.digest:  # a digest that matched (check_same_artifact) proves it the same artifact
        return table.warnings
    return table.warnings + (f"{table.path} measured {table.artifact} (its slice sizes match this artifact's, "
                             "but results.json records no digest to prove it is the same)",)


def budget_plan(artifact, sparsity=None, *, fit_memory=None, fit_params=None, fit_speedup=None,
                fit_options: dict | None = None, dtype="auto", tp_size: int = 1,
                channel_multiple: int = 1) -> SlicePlan | None:
    """The plan a budget chooses for `load` / `export` (None when no budget is given); `fit_options`: fit's
    other keywords (max_model_len, max_num_seqs, kv_cache_dtype, reserve, batch_size, speed_table)."""
    if fit_memory is None and fit_params is None and fit_speedup is None:
        return None
    check_one_size(sparsity, fit_memory, fit_params, fit_speedup)
    return fit(artifact, memory=fit_memory, params=fit_params, speedup=fit_speedup, dtype=dtype, tp_size=tp_size,
               channel_multiple=channel_multiple, **(fit_options or {})).plan


def _ranking_and_config(artifact, config, verify: bool):
    if isinstance(artifact, Ranking):
        if config is None:
            raise ValueError("fit(ranking, ...) needs the dense model's config=")
        return artifact, config, None
    if not hasattr(artifact, "ranking"):
        from .artifact import load_artifact

        artifact = load_artifact(artifact, verify=verify, weights=False)  # metadata is all a budget needs
    return artifact.ranking, artifact.config, artifact


def _neighbours(ranking: Ranking, chosen: int, cost) -> list[tuple[SliceCost, str]]:
    """The chosen slice, the next larger one (one removal fewer), the dense model and the two round sparsities on
    each side of the chosen one, in sparsity order."""
    grid = [ranking.prefix_length(round(GRID * k, 1)) for k in range(1, int(ranking.coverage / GRID + 1e-9) + 1)]
    below = [p for p in grid if p < chosen][-2:]
    above = [p for p in grid if p > chosen][:2]
    roles = {p: "" for p in below + above}
    roles.update({0: "dense", **({chosen - 1: "next larger"} if chosen else {}), chosen: "chosen"})
    return [(cost(p)[1], roles[p]) for p in sorted(roles)]


def _impossible(c: SliceCost, broken: list[str], memory, params, reserved: int, speed: tuple) -> str:
    """One line: how much the most pruned covered slice misses by, and what to relax."""
    parts = []
    if "memory" in broken:
        need = c.memory + reserved
        parts.append(f"needs {format_bytes(need)} per GPU (weights {format_bytes(c.weight_bytes)} + KV cache "
                     f"{format_bytes(c.kv_bytes)} + reserve {format_bytes(reserved)}), {format_bytes(need - memory)} "
                     f"more than --fit-memory {format_bytes(memory)}: raise --fit-memory, lower --max-model-len or "
                     "--max-num-seqs, use --kv-cache-dtype fp8 or a larger --tp-size")
    if "parameters" in broken:
        parts.append(f"has {format_count(c.parameters)} parameters, {format_count(c.parameters - params)} more "
                     f"than --fit-params {format_count(params)}: raise --fit-params")
    if "speed-up" in broken:
        target, reached, batch = speed
        parts.append(f"reads {reached:.3f}x fewer bytes per decode step than dense at batch {batch} (its ideal "
                     f"speed-up), below --fit-speedup {target:g}: lower --fit-speedup or --batch-size")
    return (f"even the most pruned slice this artifact covers (sparsity {c.sparsity:g}) " + "; and ".join(parts)
            + "; or prune further (`gisp-deploy prune --max-sparsity`)")


def format_bytes(n: int) -> str:
    """1536 -> '1.50 KiB' (binary units, as memory is sold to GPUs)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_count(n: int) -> str:
    """5_000_000_000 -> '5.00B' (B: billions, as in a '7B model')."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
