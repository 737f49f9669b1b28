"""What serving a slice loads, counted without loading it: widths, parameters, KV-cache bytes per token."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..arguments import dtype_bytes
from ..artifact import check_weights_dir, load_artifact
from ..budget import kv_cache_elements
from ..families import CONFIG_KEY, family_named
from ..plan import padded_query_heads, plan_slice
from .process import ServeError


def is_exported(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and CONFIG_KEY in json.loads(cfg.read_text())


def has_chat_template(path: Path) -> bool:
    """The tokenizer in `path` (an artifact or an exported slice) has a chat template, which vLLM's
    /v1/chat/completions needs: chat_template.jinja, or `chat_template` in tokenizer_config.json."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):  # no or a damaged tokenizer config: loading it says so later
        return False


@dataclass(frozen=True)
class SliceSummary:
    name: str
    sparsity: float | None
    achieved_sparsity: float
    unit: str | None
    parameters: int  # everything the served model holds, embeddings and norms included (all TP ranks together)
    dense_parameters: int
    padding_parameters: int  # zero query heads that even out uneven KV groups
    kv_bytes_per_token: int  # K and V of every layer with attention, at `dtype`
    dense_kv_bytes_per_token: int
    dtype: str
    layers: int
    attention_layers: int
    mlp_layers: int
    query_heads: int  # served, padding included
    kv_heads: int

    def to_json(self) -> dict:
        return asdict(self)


def _count(cfg: dict, layers: list[tuple[int, int, int]], head_dim: int) -> tuple[int, int]:
    """(parameters, KV elements per token) of a model of this family with per-layer (q, kv, channels) widths,
    as vLLM builds it (gisp_deploy.serving.vllm_models: a missing sub-block keeps only its output bias)."""
    family = family_named(cfg["model_type"])
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    qkv_bias, o_bias, mlp_bias = family.biases(cfg)
    n = v * h * (1 if cfg.get("tie_word_embeddings", False) else 2) + h
    for q, kv, c in layers:
        if q:
            n += 2 * q * head_dim * h + 2 * kv * head_dim * h + h
            n += (q + 2 * kv) * head_dim if qkv_bias else 0
            n += 2 * head_dim if family.qk_norm else 0
        if c:
            n += 3 * c * h + h + (2 * c if mlp_bias else 0)
        n += (h if o_bias else 0) + (h if mlp_bias else 0)
    return n, kv_cache_elements([kv if q else 0 for q, kv, _ in layers], head_dim)


def _dtype_name(dtype, cfg: dict) -> str:
    name = dtype if dtype not in (None, "auto") else (cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return str(name).replace("torch.", "")


def check_slice(path, sparsity: float | None = None, *, tp_size: int = 1, channel_multiple: int = 1,
                verify: bool = True, expect_digest: str | None = None):
    """Refuse what `slice_summary` would refuse, without transformers' model code: an exported slice given a
    sparsity, or one whose shards are unsound; an artifact without a sparsity, damaged, or not covering it.
    Returns the loaded Artifact (None for an exported slice)."""
    path = Path(path)
    if is_exported(path):
        if sparsity is not None:
            raise ServeError(f"{path} is an exported slice (config.json has gisp_layers): it is served as it is; "
                             "drop --sparsity (or serve the artifact it was exported from)")
        check_weights_dir(path)  # vLLM reads them next: every shard inside the export, every header sound
        return
    if sparsity is None:
        raise ServeError(f"{path}: pass --sparsity, e.g. --sparsity 0.4 (the artifact serves any sparsity up to "
                         "its coverage; `gisp-deploy inspect` lists them)")
    art = load_artifact(path, verify=verify, expect_digest=expect_digest)
    plan_slice(art.ranking, sparsity, tp_size=tp_size, channel_multiple=channel_multiple)
    return art


def slice_summary(path, sparsity: float | None = None, *, tp_size: int = 1, channel_multiple: int = 1,
                  dtype: str | None = None, verify: bool = True, expect_digest: str | None = None) -> SliceSummary:
    """What serving `path` (an artifact at `sparsity`, or an exported slice) loads: widths, parameters, KV bytes."""
    path = Path(path)
    if is_exported(path):
        check_slice(path, sparsity)
        cfg = json.loads((path / "config.json").read_text())
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        specs = cfg[CONFIG_KEY]
        layers = [(s["q_heads"], s["kv_heads"], s["intermediate"]) for s in specs]
        q_bias = family_named(cfg["model_type"]).biases(cfg)[0]
        pad = sum(len(s.get("pad", [])) for s in specs) * (2 * head_dim * cfg["hidden_size"] + (head_dim if q_bias else 0))
        info = cfg.get("gisp_slice") or {}
        requested, achieved, unit = info.get("sparsity"), float(info.get("achieved_sparsity", float("nan"))), info.get("unit")
        dense_cfg = dict(cfg)
        n_heads, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        dense_layers = [(n_heads, n_kv, cfg["intermediate_size"])] * cfg["num_hidden_layers"]
    else:
        if sparsity is None:
            check_slice(path, sparsity)
        art = load_artifact(path, verify=verify, expect_digest=expect_digest)
        plan = plan_slice(art.ranking, sparsity, tp_size=tp_size, channel_multiple=channel_multiple)
        s = plan.shape
        layers = [(padded_query_heads(lp.q_heads, s.group_size), len(lp.kv_heads), len(lp.channels))
                  for lp in plan.layers]
        pad = sum(q - len(lp.q_heads) for (q, _, _), lp in zip(layers, plan.layers)) * s.q_head_params
        head_dim = s.head_dim
        requested, achieved, unit = plan.sparsity, plan.achieved_sparsity, plan.unit
        cfg = dense_cfg = art.config_dict("vocab_size", "tie_word_embeddings")  # counted without transformers
        dense_layers = [(s.num_heads, s.num_kv_heads, s.intermediate)] * s.num_layers
    dtype = _dtype_name(dtype, cfg)
    nbytes = dtype_bytes(dtype, default=2)
    params, kv = _count(cfg, layers, head_dim)
    dense_params, dense_kv = _count(dense_cfg, dense_layers, head_dim)
    return SliceSummary(
        name=path.resolve().name, sparsity=requested, achieved_sparsity=achieved, unit=unit, parameters=params,
        dense_parameters=dense_params, padding_parameters=pad, kv_bytes_per_token=kv * nbytes,
        dense_kv_bytes_per_token=dense_kv * nbytes, dtype=dtype, layers=len(layers),
        attention_layers=sum(1 for q, _, _ in layers if q), mlp_layers=sum(1 for _, _, c in layers if c),
        query_heads=sum(q for q, _, _ in layers), kv_heads=sum(k for _, k, _ in layers))
