"""The family table is the one home of each family's facts: the places that must restate them agree with it,
and its bias rules are the ones transformers' own classes build."""

import pytest
import torch

from gisp_deploy import modeling
from gisp_deploy.families import FAMILIES, GISP_ARCHITECTURES, ModelShape, UnsupportedModelError, family_named
from gisp_deploy.serving import vllm_slice
from tests.factory import tiny_config


def test_compact_classes_restate_the_family_table():
    assert set(modeling.GISP_CLASSES) == {f.name for f in FAMILIES}
    for fam in FAMILIES:
        config_cls, model_cls = modeling.GISP_CLASSES[fam.name]
        assert config_cls.model_type == fam.gisp_model_type
        assert model_cls.__name__ == fam.gisp_architecture
    assert GISP_ARCHITECTURES == tuple(modeling.GISP_CLASSES[f.name][1].__name__ for f in FAMILIES)
    assert vllm_slice.CONFIG_KEY == modeling.CONFIG_KEY


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
