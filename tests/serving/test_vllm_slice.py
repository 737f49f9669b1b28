"""The slice a vLLM engine builds and the weights it is given, without vLLM: `vllm_slice` is pure code, run here
on configs shaped like vLLM's and on the checkpoint's real tensors."""

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from gisp_deploy.artifact import load_artifact, write_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.layout import head_rows, padding_from_file
from gisp_deploy.modeling import plan_layouts
from gisp_deploy.plan import plan_slice
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.serving.vllm_slice import GispConfigError, LayerSpec, VllmSlice, slice_for, slice_weights
from gisp_deploy.slicing.loader import load
from tests.factory import make_model_dir


def _vllm_config(hf_config, model: str, tp: int = 1):
    """The attributes of vLLM's VllmConfig that slice_for reads."""
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config, model=model),
                           parallel_config=SimpleNamespace(tensor_parallel_size=tp))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("vllm-slice")
    model_dir = make_model_dir(root, "qwen2-gqa")  # q/k/v biases: sliced with their rows
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    ranking = prune(None, shape, None, PruneConfig(method="random", max_sparsity=0.7, protect_first=0,
                                                   protect_last=0))
    return load_artifact(write_artifact(root / "art", model_dir, ranking, {"method": "random"}))


def _hf_config(art, **overrides):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(art.path)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def ranked(artifact, tmp_path_factory):
    from gisp_deploy.pruning.reorder import reorder

    return load_artifact(reorder(artifact.path, tmp_path_factory.mktemp("vllm-slice-ranked") / "art"))


@pytest.mark.parametrize("layout", ["original", "rank-ordered"])  # scattered rows / one run of them, viewed
def test_artifact_slice_cuts_the_weights_as_the_loader_does(artifact, ranked, layout):
    artifact = artifact if layout == "original" else ranked
    plan = plan_slice(artifact.ranking, 0.5)
    sl = slice_for(_vllm_config(_hf_config(artifact, gisp_sparsity=0.5), str(artifact.path)))
    assert sl.layers == tuple(LayerSpec(len(l.q_src), len(l.kv_src), len(l.channels)) for l in plan_layouts(plan))
    assert any(len(l.pad) for l in plan_layouts(plan))  # uneven KV groups: zero heads in the cut weights
    dense = {}
    for f in sorted(artifact.path.glob("model*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            dense.update({k: h.get_tensor(k) for k in h.keys()})
    with safe_open(str(artifact.path / "ranking.safetensors"), framework="pt") as h:  # vLLM reads it too
        dense.update({k: h.get_tensor(k) for k in h.keys()})
    got = dict(slice_weights(sl, dense.items()))
    want = load(artifact, plan=plan).state_dict()
    assert not set(got) & {"layer", "kind", "index", "step", "score", "params"}  # the ranking is no weight
    for name, t in got.items():
        assert torch.equal(t, want[name]), name
    if layout == "rank-ordered":  # padded groups whose padding can be the file's next heads: views, no copy
        views = [n for n, lay in enumerate(plan_layouts(plan)) if len(lay.pad)
                 and padding_from_file(f"model.layers.{n}.self_attn.q_proj.weight", head_rows(lay.q_src, sl.head_dim))
                 == list(range(len(lay.q_src) * sl.head_dim))]
        assert views  # this artifact has some
        for n in views:
            name = f"model.layers.{n}.self_attn.q_proj.weight"
            assert got[name].data_ptr() == dense[name].data_ptr(), name
    dropped = set(dense) - set(got) - {"layer", "kind", "index", "step", "score", "params"}
    for name in dropped:  # only what a removed sub-block had, and its norm
        layer = int(name.split(".")[2])
        spec = sl.layers[layer]
        assert (not spec.q_heads and ("self_attn" in name or "input_layernorm" in name)) or \
            (not spec.intermediate and ("mlp" in name or "post_attention_layernorm" in name)), name


def test_exported_slice_reads_its_widths(artifact):
    cfg = SimpleNamespace(gisp_layers=[{"q_heads": 4, "kv_heads": 2, "intermediate": 16},
                                       {"q_heads": 0, "kv_heads": 0, "intermediate": 0}],
                          num_hidden_layers=2, hidden_size=32, num_attention_heads=4, head_dim=8)
    sl = slice_for(_vllm_config(cfg, "exported"))
    assert sl.layers == (LayerSpec(4, 2, 16), LayerSpec(0, 0, 0)) and sl.head_dim == 8 and sl.layouts is None
    cfg.gisp_sparsity = 0.4
    with pytest.raises(GispConfigError, match="exported slice.*drop gisp_sparsity"):
        slice_for(_vllm_config(cfg, "exported"))


def test_widths_that_do_not_split_over_the_ranks_are_refused():
    sl = VllmSlice(layers=(LayerSpec(4, 2, 16), LayerSpec(3, 1, 16)), head_dim=8)
    sl.check_tp(1)
    with pytest.raises(GispConfigError, match=r"layer 1 \(3 query heads.*tensor-parallel size 2.*gisp_tp_size=2"):
        sl.check_tp(2)
    VllmSlice(layers=(LayerSpec(4, 1, 16),), head_dim=8).check_tp(2)  # one KV head: replicated over the ranks
    with pytest.raises(GispConfigError, match="cannot be split"):
        VllmSlice(layers=(LayerSpec(4, 2, 15),), head_dim=8).check_tp(2)


def test_a_gisp_architecture_without_a_slice_names_both_ways(artifact):
    with pytest.raises(GispConfigError, match="exported slice.*or an artifact plus a sparsity"):
        slice_for(_vllm_config(_hf_config(artifact, architectures=["GispQwen2ForCausalLM"]), str(artifact.path)))
    with pytest.raises(ValueError, match="beyond what this artifact covers"):
        slice_for(_vllm_config(_hf_config(artifact, gisp_sparsity=0.95), str(artifact.path)))
