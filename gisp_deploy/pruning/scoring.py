"""Per-structure scores (|W·Ḡ| and its second-order options, magnitude, Wanda-sp), their normalisation, and
zeroing removed structures."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..arguments import SCORES
from ..families import ModelShape, layer_modules
from ..ranking import CHANNEL, HEAD, units_per_layer

NORMALIZATIONS = ("reference", "params", "none")
# arguments.SCORES: Taylor terms of the loss change when a weight is zeroed, ΔL ≈ −Ḡ·W + ½ F·W² (the authors'
# param_first, param_second, param_mix); these two need the diagonal Fisher F
NEEDS_FISHER = ("second", "mix")


def taylor_importance(weight: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor | None, score: str):
    """Per-weight importance, fp32, of zeroing `weight` ([out, in], as `grad` = Ḡ and `fisher` = Σ_i w_i g_i²):
    first |W·Ḡ|; second ½ F·W² (diagonal-Fisher curvature); mix |W·Ḡ − ½ F·W²|, the loss change to second order
    (its sign flipped, which |·| ignores)."""
    w = weight.float()
    if score == "first":
        return (w * grad).abs()
    curvature = 0.5 * fisher * w * w
    if score == "second":
        return curvature
    if score == "mix":
        return (w * grad - curvature).abs()
    raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")


def rows_per_unit(x: torch.Tensor, units: int) -> torch.Tensor:
    return x.reshape(units, -1).sum(1, dtype=torch.float64)  # [units]


def cols_per_unit(x: torch.Tensor, units: int) -> torch.Tensor:
    return x.reshape(x.shape[0], units, -1).sum((0, 2), dtype=torch.float64)  # [units]


def _aggregate(per_weight, shape: ModelShape, unit: str, with_kv: bool, layers=None):
    """Sum a per-weight quantity over each structure of `layers` (default all; others stay 0):
    per_weight(layer, proj) -> tensor."""
    units = units_per_layer(shape, unit)
    heads = torch.zeros(shape.num_layers, units, dtype=torch.float64)
    channels = torch.zeros(shape.num_layers, shape.intermediate, dtype=torch.float64)
    for layer in range(shape.num_layers) if layers is None else layers:
        h = rows_per_unit(per_weight(layer, "q_proj"), units) + cols_per_unit(per_weight(layer, "o_proj"), units)
        if with_kv:
            k = rows_per_unit(per_weight(layer, "k_proj"), shape.num_kv_heads)
            v = rows_per_unit(per_weight(layer, "v_proj"), shape.num_kv_heads)
            h = h + (k + v).repeat_interleave(units // shape.num_kv_heads)
        heads[layer] = h.cpu()
        channels[layer] = (rows_per_unit(per_weight(layer, "gate_proj"), shape.intermediate)
                           + rows_per_unit(per_weight(layer, "up_proj"), shape.intermediate)
                           + cols_per_unit(per_weight(layer, "down_proj"), shape.intermediate)).cpu()
    return heads, channels


def _weight(model, layer: int, proj: str) -> torch.Tensor:
    attn, mlp = layer_modules(model, layer)
    return getattr(attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp, proj).weight


def scores_kv(shape: ModelShape, unit: str) -> bool:
    """Whether head scores include k/v rows: yes for MHA and KV-group units; the reference scores
    GQA query heads by their q rows and o columns only."""
    return unit == "kv_group" or not shape.is_gqa


@torch.no_grad()
def gradient_scores(model: nn.Module, shape: ModelShape, unit: str, grads: dict[str, torch.Tensor], layers=None,
                    fisher: dict[str, torch.Tensor] | None = None, score: str = "first"):
    """GISP's importance: Σ over each structure's weights (of `layers`, default all) of `taylor_importance`,
    by default the first-order |W ⊙ Ḡ|."""
    def per_weight(layer, proj):
        key = f"{layer}.{proj}"
        return taylor_importance(_weight(model, layer, proj), grads[key], None if fisher is None else fisher[key], score)
    return _aggregate(per_weight, shape, unit, scores_kv(shape, unit), layers)


@torch.no_grad()
def magnitude_scores(model: nn.Module, shape: ModelShape, unit: str):
    """Σ |W| over each structure's weights (normalise per parameter: see `normalize`)."""
    return _aggregate(lambda l, p: _weight(model, l, p).float().abs(), shape, unit, scores_kv(shape, unit))


def scored_weight_count(shape: ModelShape, unit: str) -> tuple[int, int]:
    """Number of weights summed into one head score and one channel score."""
    per_head = (shape.num_heads // units_per_layer(shape, unit)) * shape.head_dim * shape.hidden * 2
    if scores_kv(shape, unit):
        per_head += shape.head_dim * shape.hidden * 2
    return per_head, 3 * shape.hidden


def normalize(heads: torch.Tensor, channels: torch.Tensor, shape: ModelShape, unit: str, mode: str):
    """Block-wise normalisation. reference: heads ÷ 4·head_dim·hidden (KV-group units: ÷ their weight
    count), channels ÷ 3·intermediate_size, as the authors' code; params: ÷ the weights each score sums."""
    if mode == "none":
        return heads, channels
    if mode == "params":
        h, c = scored_weight_count(shape, unit)
        return heads / h, channels / c
    if mode == "reference":
        h = scored_weight_count(shape, unit)[0] if unit == "kv_group" else 4 * shape.head_dim * shape.hidden
        return heads / h, channels / (3 * shape.intermediate)
    raise ValueError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")


@torch.no_grad()
def consumer_input_pass(model: nn.Module, shape: ModelShape, calib, batch_size: int, add, progress=None,
                        layers=None) -> None:
    """One forward pass over `calib`: add(layer, proj, x) is handed the inputs x [n, in] of o_proj and down_proj
    of each of `layers` (default all) at the real (attention-mask) tokens of every micro-batch."""
    state = {}
    handles = []
    for layer in range(shape.num_layers) if layers is None else layers:
        attn, mlp = layer_modules(model, layer)
        for proj, mod in (("o_proj", attn.o_proj), ("down_proj", mlp.down_proj)):
            def hook(_m, args, layer=layer, proj=proj):
                x = args[0]  # [B, T, in]
                add(layer, proj, x[state["mask"].to(x.device)])  # [n, in]
            handles.append(mod.register_forward_pre_hook(hook))
    dev = next(model.parameters()).device
    try:
        for ids, att, _lm, _w in calib.batches(batch_size):
            state["mask"] = att.bool()
            model(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=False)
            if progress is not None:
                progress(int(ids.numel()))
    finally:
        for handle in handles:
            handle.remove()


def input_norms(model: nn.Module, shape: ModelShape, calib, batch_size: int, progress=None):
    """‖X_j‖₂ over all calibration tokens of the inputs of o_proj and down_proj, per layer: Wanda-sp's statistic."""
    sq: dict[str, torch.Tensor] = {}

    def add(layer, proj, x):
        key = f"{layer}.{'o' if proj == 'o_proj' else 'down'}"
        sq[key] = sq.get(key, 0) + x.float().pow(2).sum(0)

    consumer_input_pass(model, shape, calib, batch_size, add, progress)
    return {k: v.sqrt() for k, v in sq.items()}


@torch.no_grad()
def wanda_scores(model: nn.Module, shape: ModelShape, unit: str, norms: dict[str, torch.Tensor]):
    """Wanda-sp (FLAP's baseline): Σ |W|·‖X‖ over each structure's o_proj / down_proj input columns."""
    units = units_per_layer(shape, unit)
    heads = torch.zeros(shape.num_layers, units, dtype=torch.float64)
    channels = torch.zeros(shape.num_layers, shape.intermediate, dtype=torch.float64)
    for layer in range(shape.num_layers):
        attn, mlp = layer_modules(model, layer)
        heads[layer] = cols_per_unit(attn.o_proj.weight.float().abs() * norms[f"{layer}.o"], units).cpu()
        channels[layer] = cols_per_unit(mlp.down_proj.weight.float().abs() * norms[f"{layer}.down"], shape.intermediate).cpu()
    return heads, channels


# ---- zeroing: the masked model that GISP iterates on
@torch.no_grad()
def zero_head_unit(model: nn.Module, shape: ModelShape, unit: str, layer: int, index: int,
                   kv_gone: bool = False) -> None:
    """Zero q rows (+bias) and o columns of one attention unit; its k/v rows too when the unit owns them."""
    attn, _ = layer_modules(model, layer)
    hd, g = shape.head_dim, shape.group_size
    heads = range(index * g, (index + 1) * g) if unit == "kv_group" else [index]
    for h in heads:
        attn.q_proj.weight[h * hd:(h + 1) * hd] = 0
        if attn.q_proj.bias is not None:
            attn.q_proj.bias[h * hd:(h + 1) * hd] = 0
        attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    kv = index if unit == "kv_group" else index // g
    if unit == "kv_group" or kv_gone:
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight[kv * hd:(kv + 1) * hd] = 0
            if proj.bias is not None:
                proj.bias[kv * hd:(kv + 1) * hd] = 0


@torch.no_grad()
def zero_channel(model: nn.Module, layer: int, index: int) -> None:
    _, mlp = layer_modules(model, layer)
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.weight[index] = 0
        if proj.bias is not None:
            proj.bias[index] = 0
    mlp.down_proj.weight[:, index] = 0


def zero_structure(model, shape: ModelShape, unit: str, layer: int, kind: int, index: int, kv_gone=False):
    if kind == CHANNEL:
        zero_channel(model, layer, index)
    elif kind == HEAD:
        zero_head_unit(model, shape, unit, layer, index, kv_gone)
