"""The one place that knows each supported model family's module names and shapes."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is not imported here: serve's checks before vLLM starts stay torch-free
    import torch.nn as nn


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    # Biases as the family's transformers classes build them: fixed by the family, or None = read from the
    # config (`attention_bias` for q/k/v and o, `mlp_bias` for the MLP).
    qkv_bias: bool | None
    o_bias: bool | None
    mlp_bias: bool | None
    qk_norm: bool  # per-head RMSNorm on q and k (shared across heads, so never sliced)
    # the config class derives a missing head_dim as hidden_size // num_attention_heads (Qwen3's defaults to 128)
    derived_head_dim: bool = True

    @property
    def gisp_model_type(self) -> str:  # of an exported slice (gisp_deploy/modeling.py)
        return f"gisp_{self.name}"

    @property
    def gisp_architecture(self) -> str:  # the compact class, in transformers (modeling.py) and in vLLM
        return "Gisp" + self.architectures[0]

    def biases(self, config) -> tuple[bool, bool, bool]:
        """(q/k/v bias, o_proj bias, MLP bias) of a model of this family with `config` (an object or a dict)."""
        def read(fixed, key):
            if fixed is not None:
                return fixed
            return bool(config.get(key, False) if isinstance(config, dict) else getattr(config, key, False))
        return read(self.qkv_bias, "attention_bias"), read(self.o_bias, "attention_bias"), read(self.mlp_bias, "mlp_bias")


FAMILIES = (
    Family("llama", ("llama",), ("LlamaForCausalLM",), qkv_bias=None, o_bias=None, mlp_bias=None, qk_norm=False),
    Family("mistral", ("mistral",), ("MistralForCausalLM",), qkv_bias=False, o_bias=False, mlp_bias=False,
           qk_norm=False),
    Family("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False),
    Family("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), qkv_bias=None, o_bias=None, mlp_bias=False, qk_norm=True,
           derived_head_dim=False),
)
GISP_ARCHITECTURES = tuple(f.gisp_architecture for f in FAMILIES)
CONFIG_KEY = "gisp_layers"  # an exported slice's per-layer widths in config.json (modeling.CONFIG_KEY restates it)


def family_named(name: str) -> Family:
    """The family of a name, a model_type or an exported slice's model_type ("llama", "gisp_llama")."""
    for fam in FAMILIES:
        if name in (fam.name, fam.gisp_model_type, *fam.model_types):
            return fam
    raise UnsupportedModelError(f"unsupported model type {name!r}; gisp-deploy knows "
                                f"{', '.join(f.name for f in FAMILIES)}")

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


def family_for(config) -> Family:
    """Return the family of a transformers config, or refuse it naming the architecture."""
    model_type = getattr(config, "model_type", None)
    archs = tuple(getattr(config, "architectures", None) or ())
    for fam in FAMILIES:
        if model_type in fam.model_types:
            if archs and not set(archs) & set(fam.architectures):
                break
            return fam
    supported = ", ".join(a for f in FAMILIES for a in f.architectures)
    raise UnsupportedModelError(
        f"unsupported architecture {archs[0] if archs else model_type!r} (model_type={model_type!r}); "
        f"gisp-deploy can prune and slice: {supported}. Other architectures are refused rather than "
        "risk a silently wrong slice."
    )


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a dense decoder, read from its config; every layer has the same widths."""

    family: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    q_bias: bool
    kv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        fam = family_for(config)
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        qkv_bias, o_bias, mlp_bias = fam.biases(config)
        if heads % kv:
            raise UnsupportedModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        return cls(
            family=fam.name,
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            q_bias=qkv_bias,
            kv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
        )

    @classmethod
    def from_config_json(cls, cfg: dict) -> "ModelShape | None":
        """The shape of a config.json read as plain JSON (no transformers, no torch), or None when it leaves a
        size or bias to the family's transformers defaults; then `from_config` on the real config decides.
        Sizes must be positive integers (untrusted input)."""
        attrs = SimpleNamespace(**cfg)
        fam = family_for(attrs)
        sizes = ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"]
        sizes += [] if fam.derived_head_dim and cfg.get("head_dim") is None else ["head_dim"]
        flags = [k for fixed, k in ((fam.qkv_bias, "attention_bias"), (fam.o_bias, "attention_bias"),
                                    (fam.mlp_bias, "mlp_bias")) if fixed is None]
        if any(cfg.get(k) is None for k in sizes + flags):
            return None
        for k in sizes:
            if type(cfg[k]) is not int or cfg[k] <= 0:
                raise UnsupportedModelError(f"config.json: {k}={cfg[k]!r} must be a positive integer")
        return cls.from_config(attrs)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    # Parameter counts of the pieces a slice can remove (weights plus their biases).
    @property
    def q_head_params(self) -> int:  # q rows + o columns of one query head
        return self.head_dim * self.hidden * 2 + (self.head_dim if self.q_bias else 0)

    @property
    def kv_head_params(self) -> int:  # k rows + v rows of one KV head
        return self.head_dim * self.hidden * 2 + (2 * self.head_dim if self.kv_bias else 0)

    @property
    def channel_params(self) -> int:  # gate row + up row + down column
        return 3 * self.hidden + (2 if self.mlp_bias else 0)

    @property
    def layer_params(self) -> int:
        """Linear-layer parameters of one decoder layer (the sparsity denominator's share)."""
        fixed = (self.hidden if self.o_bias else 0) + (self.hidden if self.mlp_bias else 0)
        return (self.num_heads * self.q_head_params + self.num_kv_heads * self.kv_head_params
                + self.intermediate * self.channel_params + fixed)

    @property
    def total_params(self) -> int:
        return self.num_layers * self.layer_params


def layer_modules(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module]:
    """(self_attn, mlp) of decoder layer `layer` of a supported causal LM."""
    block = model.model.layers[layer]
    return block.self_attn, block.mlp

