"""The slice a vLLM engine builds, read from its config; and the incoming weights cut to it. No vLLM import here:
the plugin's config hook runs this in vLLM's front-end process (clear errors before any worker starts), the
model classes of vllm_models in every worker.

`slice_for(vllm_config)` reads either `gisp_layers` (an exported slice: compact weights) or `gisp_sparsity`
(+ `gisp_artifact`, `gisp_tp_size`, `gisp_channel_multiple`; set through vLLM's `hf_overrides`) on the HF
config, and checks that every layer splits over the engine's tensor-parallel ranks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..families import CONFIG_KEY
from ..layout import padding_from_file, select, source_indices
from ..safetensors_file import take

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp|input_layernorm|post_attention_layernorm)\b")


class GispConfigError(ValueError):
    pass


@dataclass(frozen=True)
class LayerSpec:
    q_heads: int  # compact query heads, dummy (zero) heads included
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class VllmSlice:
    """Per-layer widths of the model vLLM builds, and how to cut them from the incoming weights."""

    layers: tuple[LayerSpec, ...]
    head_dim: int
    layouts: tuple | None = None  # modeling.LayerLayout per layer when slicing dense weights; None: compact weights
    plan: object | None = None  # the SlicePlan (artifact mode)
    skip: frozenset = frozenset()  # tensor names vLLM reads that are no weights (the ranking's columns)

    def check_tp(self, tp: int) -> None:
        for i, sp in enumerate(self.layers):
            heads_ok = sp.q_heads == 0 or (sp.q_heads % tp == 0 and (sp.kv_heads % tp == 0 or tp % sp.kv_heads == 0))
            if not heads_ok or sp.intermediate % tp:
                raise GispConfigError(
                    f"layer {i} ({sp.q_heads} query heads incl. padding, {sp.kv_heads} KV heads, {sp.intermediate} "
                    f"channels) cannot be split over tensor-parallel size {tp}; slice with tp_size={tp} rounding "
                    f"(gisp_tp_size={tp}, `serve --tensor-parallel-size {tp}`, `export --tp-size {tp}`)")


def _dense_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@functools.lru_cache(maxsize=8)
def _artifact_slice(artifact: str, sparsity: float, tp_size: int, channel_multiple: int, verify: bool) -> VllmSlice:
    from safetensors import safe_open

    from ..artifact import RANKING, load_artifact
    from ..modeling import plan_layouts
    from ..plan import plan_slice

    art = load_artifact(artifact, verify=verify)
    with safe_open(str(Path(artifact) / RANKING), framework="pt") as f:  # vLLM reads every *.safetensors file
        skip = frozenset(f.keys())
    plan = plan_slice(art.ranking, sparsity, tp_size=tp_size, channel_multiple=channel_multiple)
    layouts = tuple(plan_layouts(plan))
    specs = tuple(LayerSpec(len(lay.q_src), len(lay.kv_src), len(lay.channels)) for lay in layouts)
    return VllmSlice(layers=specs, head_dim=plan.shape.head_dim, layouts=layouts, plan=plan, skip=skip)


def slice_for(vllm_config) -> VllmSlice:
    """The slice vLLM is asked to build: from config.gisp_layers (exported) or artifact + gisp_sparsity."""
    model_config = vllm_config.model_config
    config = model_config.hf_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    layers = getattr(config, CONFIG_KEY, None)
    sparsity = getattr(config, "gisp_sparsity", None)
    if layers is not None:
        if sparsity is not None:
            raise GispConfigError(f"{model_config.model} is an exported slice (config.json has {CONFIG_KEY}); "
                                  "it has no ranking to slice again: drop gisp_sparsity")
        if len(layers) != config.num_hidden_layers:
            raise GispConfigError(f"config.{CONFIG_KEY} has {len(layers)} entries for {config.num_hidden_layers} layers")
        sl = VllmSlice(layers=tuple(LayerSpec(int(s["q_heads"]), int(s["kv_heads"]), int(s["intermediate"]))
                                    for s in layers), head_dim=_dense_head_dim(config))
    elif sparsity is not None:
        artifact = str(Path(getattr(config, "gisp_artifact", None) or model_config.model).resolve())
        sl = _artifact_slice(artifact, float(sparsity), int(getattr(config, "gisp_tp_size", None) or tp),
                             int(getattr(config, "gisp_channel_multiple", None) or 1),
                             bool(getattr(config, "gisp_verify", True)))
        if sl.head_dim != _dense_head_dim(config):
            raise GispConfigError(f"the artifact {artifact} has head size {sl.head_dim}, the config vLLM loaded "
                                  f"{_dense_head_dim(config)}: point vLLM at the artifact's own directory")
    else:
        raise GispConfigError(
            f"{model_config.model}: a Gisp* architecture needs either an exported slice (config.json with "
            f"{CONFIG_KEY!r}) or an artifact plus a sparsity, e.g. hf_overrides={{'architectures': "
            f"{list(config.architectures or [])}, 'gisp_sparsity': 0.4}}")
    sl.check_tp(tp)
    return sl


class VerifyConfig:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`), run where the engine is configured: a
    sparsity beyond coverage or widths that do not split over the ranks fail there, with our message."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        pass

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        slice_for(vllm_config)


# ---- slicing the incoming weights
def slice_weights(sl: VllmSlice, weights: Iterable[tuple[str, torch.Tensor]]):
    """The checkpoint's (name, tensor) pairs as the compact model needs them: the kept rows / columns of each
    dense tensor (artifact mode; compact tensors pass through), nothing for sub-blocks the slice removed
    except their output bias."""
    for name, t in weights:
        if name in sl.skip:
            continue
        m = _LAYER_KEY.match(name)
        if m:
            spec = sl.layers[int(m.group(1))]
            part, rest = m.group(2), name[m.end():]
            if (part == "input_layernorm" and not spec.q_heads) or \
                    (part == "post_attention_layernorm" and not spec.intermediate):
                continue
            if part == "self_attn" and not spec.q_heads and rest != ".o_proj.bias":
                continue
            if part == "mlp" and not spec.intermediate and rest != ".down_proj.bias":
                continue
            if sl.layouts is not None:
                rows, cols = source_indices(name, sl.layouts, sl.head_dim)
                if rows is not None:
                    filled = padding_from_file(name, rows)  # a padded group as one run of the file's rows
                    t = _cut(t, filled if filled and _one_run(filled, t.shape[0]) else rows, 0)
                elif cols is not None:
                    t = _cut(t, cols, 1)
        yield name, t


def _one_run(positions: list[int], size: int) -> bool:
    """Whether `positions` are consecutive entries of a dimension of `size`, without padding."""
    return bool(positions) and 0 <= positions[0] and positions[-1] < size and \
        positions == list(range(positions[0], positions[0] + len(positions)))


def _cut(t: torch.Tensor, positions: list[int], dim: int) -> torch.Tensor:
    """select(), and for the CPU tensors vLLM reads (memory-mapped, no padding) numpy's take: it waits on no
    thread pool, and gathers columns several times as fast (bench/results/host_memory.json)."""
    if _one_run(positions, t.shape[dim]):
        return t.narrow(dim, positions[0], len(positions))  # one run (a rank-ordered artifact's): a view, no copy
    if t.device.type != "cpu" or t.requires_grad or not t.is_contiguous() or min(positions, default=0) < 0:
        return select(t, positions, dim)
    shape = list(t.shape)
    shape[dim] = len(positions)
    out = torch.empty(shape, dtype=t.dtype)
    take(t, torch.tensor(positions, dtype=torch.long), dim, out)
    return out
