"""vLLM model classes for GISP slices: every decoder layer with its own head count, KV heads and MLP size.

Registered with vLLM by `gisp_deploy.serving.vllm_plugin` under the architecture names that `gisp-deploy export`
writes (`GispLlamaForCausalLM`, `GispMistralForCausalLM`, `GispQwen2ForCausalLM`, `GispQwen3ForCausalLM`).
Two ways to point vLLM at a slice:

- an ARTIFACT directory, sliced at load time: `LLM(artifact, hf_overrides={"architectures":
  ["GispLlamaForCausalLM"], "gisp_sparsity": 0.4})` (optional keys: `gisp_artifact`, the artifact path
  when vLLM's model path is another directory holding the same weights; `gisp_tp_size`, default the
  engine's tensor-parallel size; `gisp_channel_multiple`, default 1). The model computes the SlicePlan
  from the artifact's ranking and `load_weights` keeps only the ranked prefix's rows / columns of the
  dense tensors vLLM reads (`gisp_deploy.serving.launch.vllm_overrides(artifact, 0.4)` builds that dict);
- an exported directory (config.json with `gisp_layers`): the weights are already compact.

Layers follow modeling.py's LayerLayout: uneven KV groups are padded with zero query heads (q rows and
o columns zero: exactly the same output), a layer without query heads has no attention module at all
(hence no KV cache in vLLM, only o_proj's bias if the family has one), a layer without channels no MLP.

A corrected slice (an export whose config has `gisp_refit`) has a bias on o_proj and down_proj that the family's
vLLM modules may not hold (no bias option on Qwen3's attention or Qwen2's MLP; LlamaMLP's would add one to
gate/up too): the layer keeps them itself (`refit_o_bias`, `refit_down_bias`, loaded from the checkpoint's
`self_attn.o_proj.bias` / `mlp.down_proj.bias`) and adds them after the sub-block's output (after tensor-parallel
reduction, once).

The attention / MLP / norm modules are vLLM's own classes. The causal-LM and model classes are vLLM's
LlamaForCausalLM / MistralForCausalLM (whose LlamaModel takes the decoder-layer class as an argument; the
Qwen2/Qwen3 model classes don't, and assemble the same embed/layers/norm/lm_head modules under the same
names). Qwen2 layers use vLLM's LlamaAttention with q/k/v bias and no o bias, because vLLM's
Qwen2Attention derives its head size from hidden_size / num_heads, which a pruned layer no longer obeys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.mistral import MistralAttention, MistralForCausalLM, MistralMLP
from vllm.model_executor.models.qwen2 import Qwen2MLP
from vllm.model_executor.models.qwen3 import Qwen3Attention
from vllm.model_executor.models.utils import extract_layer_index

from ..families import family_named
from .vllm_slice import LayerSpec, slice_for, slice_weights


# ---- what remains of a sub-block that lost everything: its output bias, if the family has one
class _Bias(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size), requires_grad=False)


class EmptyBlock(nn.Module):
    """Attention (`o_proj`) or MLP (`down_proj`) without inputs: adds its bias to the residual stream, or nothing.
    Parameter names match the checkpoint's (`self_attn.o_proj.bias`, `mlp.down_proj.bias`)."""

    def __init__(self, proj: str, hidden: int, bias: bool):
        super().__init__()
        self.proj = proj
        if bias:
            self.add_module(proj, _Bias(hidden))

    @property
    def bias(self) -> torch.Tensor | None:
        sub = getattr(self, self.proj, None)
        return None if sub is None else sub.bias


# ---- per-family sub-block builders (vLLM's own modules)
def _attention_bias(config) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) as vLLM's LlamaDecoderLayer reads them."""
    bias = bool(getattr(config, "attention_bias", False) or getattr(config, "bias", False))
    return bool(getattr(config, "qkv_bias", bias)), bias


def _llama_like_attention(cls, qkv_bias=None, o_bias=None):
    def make(config, spec: LayerSpec, cache_config, quant_config, prefix):
        qkv, o = _attention_bias(config)
        return cls(config=config, hidden_size=config.hidden_size, num_heads=spec.q_heads, num_kv_heads=spec.kv_heads,
                   max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
                   quant_config=quant_config, bias=qkv if qkv_bias is None else qkv_bias,
                   bias_o_proj=o if o_bias is None else o_bias, cache_config=cache_config, prefix=prefix)
    return make


def _qwen3_attention(config, spec: LayerSpec, cache_config, quant_config, prefix):
    return Qwen3Attention(hidden_size=config.hidden_size, num_heads=spec.q_heads, num_kv_heads=spec.kv_heads,
                          rope_parameters=config.rope_parameters, max_position=config.max_position_embeddings,
                          head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
                          qkv_bias=getattr(config, "attention_bias", False), cache_config=cache_config,
                          quant_config=quant_config, prefix=prefix)


def _llama_like_mlp(cls):
    def make(config, spec: LayerSpec, quant_config, prefix):
        return cls(hidden_size=config.hidden_size, intermediate_size=spec.intermediate, hidden_act=config.hidden_act,
                   quant_config=quant_config, bias=getattr(config, "mlp_bias", False), prefix=prefix)
    return make


def _qwen_mlp(config, spec: LayerSpec, quant_config, prefix):
    return Qwen2MLP(hidden_size=config.hidden_size, intermediate_size=spec.intermediate,
                    hidden_act=config.hidden_act, quant_config=quant_config, prefix=prefix)


@dataclass(frozen=True)
class _Builders:
    """How vLLM's own modules are built for a family (which bias a checkpoint has is `families`' to say)."""

    attention: object
    mlp: object
    default_rope_theta: float | None = None


BUILDERS = {
    "llama": _Builders(_llama_like_attention(LlamaAttention), _llama_like_mlp(LlamaMLP)),
    "mistral": _Builders(_llama_like_attention(MistralAttention), _llama_like_mlp(MistralMLP)),
    "qwen2": _Builders(_llama_like_attention(LlamaAttention, qkv_bias=True, o_bias=False), _qwen_mlp,
                       default_rope_theta=1000000),
    "qwen3": _Builders(_qwen3_attention, _qwen_mlp, default_rope_theta=1000000),
}


class GispDecoderLayer(nn.Module):
    """One decoder layer at its own widths; `self_attn` / `mlp` are EmptyBlocks when the slice removed them.

    vLLM carries the residual stream as (hidden_states, residual) with stream = hidden_states + residual
    (RMSNorm(x, residual) adds, then normalises); a missing sub-block leaves that pair as it is, plus bias."""

    family = "llama"

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, **_):
        super().__init__()
        config = config or vllm_config.model_config.hf_config
        fam = BUILDERS[self.family]
        _, o_bias, mlp_bias = family_named(self.family).biases(config)
        if fam.default_rope_theta is not None:
            from vllm.transformers_utils.config import set_default_rope_theta

            set_default_rope_theta(config, default_theta=fam.default_rope_theta)
        self.layer_idx = extract_layer_index(prefix)
        spec = slice_for(vllm_config).layers[self.layer_idx]
        self.spec = spec
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        hidden = config.hidden_size
        if spec.q_heads:
            self.self_attn = fam.attention(config, spec, cache_config, quant_config, f"{prefix}.self_attn")
            self.input_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        else:
            self.self_attn = EmptyBlock("o_proj", hidden, o_bias)
        if spec.intermediate:
            self.mlp = fam.mlp(config, spec, quant_config, f"{prefix}.mlp")
            self.post_attention_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        else:
            self.mlp = EmptyBlock("down_proj", hidden, mlp_bias)
        corrected = bool(getattr(config, "gisp_refit", None))
        if corrected and spec.q_heads and not o_bias:
            self.refit_o_bias = nn.Parameter(torch.zeros(hidden), requires_grad=False)
        if corrected and spec.intermediate and not mlp_bias:
            self.refit_down_bias = nn.Parameter(torch.zeros(hidden), requires_grad=False)
        if corrected and not spec.q_heads and not o_bias:
            self.self_attn = EmptyBlock("o_proj", hidden, True)
        if corrected and not spec.intermediate and not mlp_bias:
            self.mlp = EmptyBlock("down_proj", hidden, True)

    def _attention(self, positions, hidden_states):
        out = self.self_attn(positions=positions, hidden_states=hidden_states)
        bias = getattr(self, "refit_o_bias", None)
        return out if bias is None else out + bias

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **_) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # first layer: the stream is hidden_states alone
            if isinstance(self.self_attn, EmptyBlock):
                residual, hidden_states = hidden_states, torch.zeros_like(hidden_states)
            else:
                residual = hidden_states
                hidden_states = self._attention(positions, self.input_layernorm(hidden_states))
                return self._mlp(hidden_states, residual)
        if isinstance(self.self_attn, EmptyBlock):
            if self.self_attn.bias is not None:
                hidden_states = hidden_states + self.self_attn.bias
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
            hidden_states = self._attention(positions, hidden_states)
        return self._mlp(hidden_states, residual)

    def _mlp(self, hidden_states, residual):
        if isinstance(self.mlp, EmptyBlock):
            if self.mlp.bias is not None:
                hidden_states = hidden_states + self.mlp.bias
            return hidden_states, residual
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        out = self.mlp(hidden_states)
        bias = getattr(self, "refit_down_bias", None)
        return (out if bias is None else out + bias), residual


class _GispCausalLM:
    """Mixin over vLLM's LlamaForCausalLM (or a subclass): builds GispDecoderLayers, slices weights on load."""

    layer_class = GispDecoderLayer

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **_):
        config = vllm_config.model_config.hf_config
        self.gisp_slice = slice_for(vllm_config)
        if getattr(config, "head_dim", None) is None:  # the pruned head counts no longer determine it
            config.head_dim = self.gisp_slice.head_dim
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=self.layer_class)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        own: set[str] = set()
        loaded = super().load_weights(self._correction_biases(slice_weights(self.gisp_slice, weights), own))
        return loaded | own

    def _correction_biases(self, weights, own: set):
        """A corrected slice's o_proj / down_proj biases into the layers' own parameters; the rest passes on."""
        params = dict(self.named_parameters())
        for name, t in weights:
            m = _CORRECTION_BIAS.match(name)
            mine = m and f"model.layers.{m.group(1)}.refit_{m.group(2)}_bias"
            if mine and mine in params:
                params[mine].data.copy_(t.to(params[mine].dtype))
                own.add(mine)
                continue
            yield name, t


_CORRECTION_BIAS = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(o|down)_proj\.bias$")


def _layer(family: str) -> type:
    return type(f"Gisp{family.capitalize()}DecoderLayer", (GispDecoderLayer,), {"family": family})


class GispLlamaForCausalLM(_GispCausalLM, LlamaForCausalLM):
    layer_class = _layer("llama")


class GispMistralForCausalLM(_GispCausalLM, MistralForCausalLM):
    layer_class = _layer("mistral")


class GispQwen2ForCausalLM(_GispCausalLM, LlamaForCausalLM):
    layer_class = _layer("qwen2")


class GispQwen3ForCausalLM(_GispCausalLM, LlamaForCausalLM):
    layer_class = _layer("qwen3")
