"""Deploy by budget: what a slice costs (parameters, weight and KV-cache bytes) and the largest slice that fits."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .arguments import DEFAULT_RESERVE, DTYPE_NAMES, check_one_size, FP8_KV_CACHE_DTYPES, parse_bytes, parse_count, parse_reserve
from .hf import dtype_bytes
from .plan import SlicePlan, plan_slice
from .ranking import Ranking

GRID = 0.1  # the round sparsities shown next to the chosen slice


def kv_cache_elements(kv_heads, head_dim: int) -> int:
    """K and V elements one token adds to the cache: 2 x head_dim per KV head, over layers that each keep their
    own number of KV heads (`kv_heads`, one count per layer; a layer without attention caches nothing)."""
    return 2 * head_dim * sum(kv_heads)


def rank_kv_heads(kv: int, tp_size: int) -> int:
    """KV heads one tensor-parallel rank caches: its share when they split, one replica when fewer than ranks
    (vLLM's rule; deployment rounding makes kv divide tp or tp divide kv)."""
    return kv // tp_size if kv >= tp_size else min(kv, 1)


def model_parameters(config, plan: SlicePlan) -> int:
    """Parameters of the compact model of `plan`, built on the meta device (nothing allocated): embeddings, norms
    and the padding query heads included, a tied embedding once."""
    from .modeling import build_model, compact_config  # transformers' model code: only where counted

    return sum(p.numel() for p in build_model(compact_config(config, plan)).parameters())


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
    parameters: int  # of the compact model: embeddings, norms and padding heads included
    weight_bytes: int  # parameters x dtype bytes / tp_size (vLLM splits layers and embeddings over the ranks)
    kv_bytes_per_token: int  # every layer's own KV heads (a rank's share) x head_dim x 2 (K, V) x KV dtype bytes
    kv_bytes: int  # kv_bytes_per_token x max_model_len x max_num_seqs

    @property
    def memory(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def to_json(self) -> dict:
        return {**asdict(self), "memory_bytes": self.memory}


def slice_cost(config, plan: SlicePlan, *, dtype="auto", kv_cache_dtype=None, tokens: int = 0,
               parameters: int | None = None) -> SliceCost:
    """The cost of serving `plan` in `dtype` with a KV cache of `tokens` tokens (`parameters`: already counted)."""
    weights = weight_dtype(dtype, config)
    n = model_parameters(config, plan) if parameters is None else parameters
    kv = kv_cache_elements([rank_kv_heads(len(lp.kv_heads), plan.tp_size) for lp in plan.layers],
                           plan.shape.head_dim) * kv_dtype_bytes(kv_cache_dtype, weights)
    return SliceCost(sparsity=plan.sparsity, achieved_sparsity=plan.achieved_sparsity, parameters=n,
                     weight_bytes=-(-n * dtype_bytes(weights) // plan.tp_size), kv_bytes_per_token=kv,
                     kv_bytes=kv * tokens)


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


@dataclass(frozen=True)
class FitResult:
    plan: SlicePlan  # the chosen slice, rounded as it is served
    cost: SliceCost
    binding: str  # the constraint the next larger slice breaks: "memory", "parameters", both, or "none" (dense fits)
    headroom: dict  # per budget given: what is left once the chosen slice is in (bytes per GPU; parameters)
    candidates: tuple[Candidate, ...]  # in sparsity order
    dense_kv_bytes_per_token: int
    settings: dict  # the budget and deployment settings the search used

    def to_json(self) -> dict:
        return {"sparsity": self.cost.sparsity, "achieved_sparsity": round(self.cost.achieved_sparsity, 6),
                "cost": self.cost.to_json(), "binding": self.binding, "headroom": self.headroom,
                "dense_kv_bytes_per_token": self.dense_kv_bytes_per_token, "settings": self.settings,
                "candidates": [{**c.cost.to_json(), "fits": c.fits, "role": c.role} for c in self.candidates]}


def fit(artifact, *, config=None, memory=None, params=None, max_model_len: int | None = None, max_num_seqs: int = 1,
        dtype="auto", kv_cache_dtype=None, reserve=DEFAULT_RESERVE, tp_size: int = 1, channel_multiple: int = 1,
        verify: bool = True) -> FitResult:
    """The largest slice of `artifact` (an Artifact, its path, or a Ranking with `config`) that fits a budget:
    `memory` per GPU (weights + KV cache for max_model_len x max_num_seqs tokens + `reserve`) and / or `params`
    (sizes may be strings: '24GiB', '5B'). Deployment rounding is applied to every candidate, so the slice
    reported is the one served with the same tp_size / channel_multiple."""
    ranking, config = _ranking_and_config(artifact, config, verify)
    memory = parse_bytes(memory) if isinstance(memory, str) else memory
    params = parse_count(params) if isinstance(params, str) else params
    if memory is None and params is None:
        raise ValueError("no budget given: pass --fit-memory (e.g. 24GiB) and/or --fit-params (e.g. 5B)")
    reserve = Reserve.parse(reserve)
    reserved = reserve.of(memory) if memory is not None else 0
    max_model_len = max_model_len or config.max_position_embeddings
    tokens = max_model_len * max_num_seqs
    counted: dict = {}  # plan layers -> parameters (rounding maps many prefixes to one plan)

    def cost(prefix: int) -> tuple[SlicePlan, SliceCost]:
        plan = plan_slice(ranking, prefix_sparsity(ranking, prefix), tp_size=tp_size, channel_multiple=channel_multiple)
        if plan.layers not in counted:
            counted[plan.layers] = model_parameters(config, plan)
        return plan, slice_cost(config, plan, dtype=dtype, kv_cache_dtype=kv_cache_dtype, tokens=tokens,
                                parameters=counted[plan.layers])

    def broken(c: SliceCost) -> list[str]:
        return [name for name, ok in (("memory", memory is None or c.memory + reserved <= memory),
                                      ("parameters", params is None or c.parameters <= params)) if not ok]

    # Slices are nested and rounding only adds back a layer's own top-ranked structures, so every cost is
    # non-increasing in the prefix length: the first prefix that fits is the largest slice that does.
    low, high = 0, ranking.num_covered
    most_pruned = cost(high)[1]
    if broken(most_pruned):
        raise ValueError(_impossible(most_pruned, broken(most_pruned), memory, params, reserved))
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if broken(cost(mid)[1]) else (low, mid)
    plan, chosen = cost(low)
    binding = " and ".join(broken(cost(low - 1)[1])) if low else "none"
    headroom = {**({"memory": memory - reserved - chosen.memory} if memory is not None else {}),
                **({"parameters": params - chosen.parameters} if params is not None else {})}
    candidates = [Candidate(c, not broken(c), role) for c, role in _neighbours(ranking, low, cost)]
    settings = {"memory": memory, "params": params, "reserve": str(reserve), "reserve_bytes": reserved,
                "max_model_len": max_model_len, "max_num_seqs": max_num_seqs, "dtype": weight_dtype(dtype, config),
                "kv_cache_dtype": kv_cache_dtype or "auto", "tp_size": tp_size, "channel_multiple": channel_multiple,
                "unit": ranking.unit, "coverage": round(ranking.coverage, 6)}
    return FitResult(plan=plan, cost=chosen, binding=binding, headroom=headroom, candidates=tuple(candidates),
                     dense_kv_bytes_per_token=cost(0)[1].kv_bytes_per_token, settings=settings)


def budget_plan(artifact, sparsity=None, *, fit_memory=None, fit_params=None, fit_options: dict | None = None,
                dtype="auto", tp_size: int = 1, channel_multiple: int = 1) -> SlicePlan | None:
    """The plan a budget chooses for `load` / `export` (None when no budget is given); `fit_options`: fit's
    other keywords (max_model_len, max_num_seqs, kv_cache_dtype, reserve)."""
    if fit_memory is None and fit_params is None:
        return None
    check_one_size(sparsity, fit_memory, fit_params)
    return fit(artifact, memory=fit_memory, params=fit_params, dtype=dtype, tp_size=tp_size,
               channel_multiple=channel_multiple, **(fit_options or {})).plan


def _ranking_and_config(artifact, config, verify: bool):
    if isinstance(artifact, Ranking):
        if config is None:
            raise ValueError("fit(ranking, ...) needs the dense model's config=")
        return artifact, config
    if not hasattr(artifact, "ranking"):
        from .artifact import load_artifact

        artifact = load_artifact(artifact, verify=verify, weights=False)  # metadata is all a budget needs
    return artifact.ranking, artifact.config


def _neighbours(ranking: Ranking, chosen: int, cost) -> list[tuple[SliceCost, str]]:
    """The chosen slice, the next larger one (one removal fewer), the dense model and the two round sparsities on
    each side of the chosen one, in sparsity order."""
    grid = [ranking.prefix_length(round(GRID * k, 1)) for k in range(1, int(ranking.coverage / GRID + 1e-9) + 1)]
    below = [p for p in grid if p < chosen][-2:]
    above = [p for p in grid if p > chosen][:2]
    roles = {p: "" for p in below + above}
    roles.update({0: "dense", **({chosen - 1: "next larger"} if chosen else {}), chosen: "chosen"})
    return [(cost(p)[1], roles[p]) for p in sorted(roles)]


def _impossible(c: SliceCost, broken: list[str], memory, params, reserved: int) -> str:
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
