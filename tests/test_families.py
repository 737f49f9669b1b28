"""The family table is the one home of each family's facts: the places that must restate them agree with it,
and its bias rules are the ones transformers' own classes build."""

import json

import pytest
import torch

from gisp_deploy import modeling
from gisp_deploy.families import (CONFIG_KEY, FAMILIES, GISP_ARCHITECTURES, ModelShape, UnsupportedModelError,
                                  family_named)
from gisp_deploy.serving import vllm_slice
from tests.factory import tiny_config


def test_compact_classes_restate_the_family_table():
    assert set(modeling.GISP_CLASSES) == {f.name for f in FAMILIES}
    for fam in FAMILIES:
        config_cls, model_cls = modeling.GISP_CLASSES[fam.name]
        assert config_cls.model_type == fam.gisp_model_type
        assert model_cls.__name__ == fam.gisp_architecture
    assert GISP_ARCHITECTURES == tuple(modeling.GISP_CLASSES[f.name][1].__name__ for f in FAMILIES)
    assert vllm_slice.CONFIG_KEY == modeling.CONFIG_KEY == CONFIG_KEY


def test_family_named_takes_every_spelling():
    for fam in FAMILIES:
        assert family_named(fam.name) is family_named(fam.gisp_model_type) is fam
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        family_named("gpt2")


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
@pytest.mark.parametrize("attention_bias,mlp_bias", [(False, False), (True, True)])
def test_bias_rules_are_what_transformers_builds(family, attention_bias, mlp_bias):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, attention_bias=attention_bias, mlp_bias=mlp_bias, num_hidden_layers=1)
    with torch.device("meta"):
        layer = AutoModelForCausalLM.from_config(cfg).model.layers[0]
    shape = ModelShape.from_config(cfg)
    assert shape.q_bias == (layer.self_attn.q_proj.bias is not None)
    assert shape.kv_bias == (layer.self_attn.k_proj.bias is not None)
    assert shape.o_bias == (layer.self_attn.o_proj.bias is not None)
    assert shape.mlp_bias == (layer.mlp.gate_proj.bias is not None) == (layer.mlp.down_proj.bias is not None)
    assert family_named(family).biases(cfg.to_dict()) == (shape.q_bias, shape.o_bias, shape.mlp_bias)


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
@pytest.mark.parametrize("drop", [None, "head_dim", "num_key_value_heads", "attention_bias"])
def test_the_shape_read_as_plain_json_is_the_one_transformers_gives(tmp_path, family, drop):
    """serve's checks read config.json without transformers; where the file leaves a size to the config class's
    defaults (Qwen3's head_dim is 128, not hidden // heads), they step aside and the real config decides."""
    from transformers import AutoConfig

    tiny_config(family, attention_bias=True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop(drop, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plain = ModelShape.from_config_json(cfg)
    try:
        real = ModelShape.from_config(AutoConfig.from_pretrained(tmp_path))
    except UnsupportedModelError:  # the class's default of 8 or 32 KV heads does not divide these 4 heads
        real = None
    assert plain in (None, real)
    fam = family_named(family)
    derived = drop == "head_dim" and fam.derived_head_dim
    reads_bias = drop == "attention_bias" and None in (fam.qkv_bias, fam.o_bias)
    assert (plain is None) == (drop == "num_key_value_heads" or (drop == "head_dim" and not derived) or reads_bias)


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_derived_head_dim_is_what_the_config_class_does(tmp_path, family):
    from transformers import AutoConfig

    cfg = tiny_config(family, hidden_size=48, num_attention_heads=4).to_dict()
    cfg.pop("head_dim", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    real = AutoConfig.from_pretrained(tmp_path)
    derived = (getattr(real, "head_dim", None) or 48 // 4) == 48 // 4
    assert family_named(family).derived_head_dim == derived


@pytest.mark.parametrize("value", ["64", 0, -1, 2.0, True])
def test_a_crafted_size_in_config_json_is_refused(value):
    cfg = tiny_config("llama").to_dict()
    cfg["hidden_size"] = value
    with pytest.raises(UnsupportedModelError, match="hidden_size=.*must be a positive integer"):
        ModelShape.from_config_json(cfg)
