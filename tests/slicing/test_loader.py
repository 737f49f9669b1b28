"""Load-time slicing: the compact model computes exactly what the oracle (dense, removed structures zeroed) does."""

import json

import pytest
import torch
from safetensors import safe_open

from gisp_deploy.artifact import ArtifactError, load_artifact, write_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.modeling import build_model, padding_params
from gisp_deploy.plan import plan_slice
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.safetensors_file import ShardFile
from gisp_deploy.arguments import SparsityError
from gisp_deploy.slicing.loader import load
from gisp_deploy.slicing.oracle import apply_oracle
from tests.factory import (EXAMPLE_MODEL, FAMILIES, assert_matches, decoder_linear_params, dense_model, extreme_plans,
                           hand_plan, probe_ids)




# ---- every family, both units, several sparsities
@pytest.mark.parametrize("unit", ["q_head", "kv_group"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_slices_match_oracle(sources, name, unit):
    src = sources(name, unit)
    ids = probe_ids()
    for s in (0.0, 0.35, 0.7):
        plan = plan_slice(src.artifact.ranking, s)
        oracle, want = src.oracle(plan), None
        for attn in ("eager", "sdpa"):  # both attention paths; generate on the default one (sdpa)
            model = load(src.artifact, s, attn_implementation=attn)
            assert model.config._attn_implementation == attn
            want = assert_matches(model, oracle, ids, generate=attn == "sdpa", want=want)
        assert decoder_linear_params(model) == plan.kept_params + padding_params(plan)
        specs = model.config.gisp_layers
        for spec, lp, block in zip(specs, plan.layers, model.model.layers):
            assert spec["kv_heads"] == len(lp.kv_heads) and spec["intermediate"] == len(lp.channels)
            assert spec["q_heads"] == len(lp.q_heads) + len(spec["pad"])
            if unit == "kv_group" or not src.shape.is_gqa:
                assert spec["pad"] == []
            if spec["q_heads"]:
                assert block.self_attn.num_key_value_groups == spec["q_heads"] // spec["kv_heads"]
        if s == 0:
            assert decoder_linear_params(model) == src.shape.total_params and not any(sp["pad"] for sp in specs)


# ---- layers that lose everything, uneven KV groups, hand-built plans
@pytest.mark.parametrize("name", list(FAMILIES))
def test_empty_layers_and_uneven_groups(sources, name):
    src = sources(name)
    shape = src.shape
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    for what, layers in extreme_plans(shape).items():
        plan = hand_plan(shape, layers)
        oracle, want = src.oracle(plan), None
        for attn in ("eager", "sdpa"):
            model = load(src.artifact, plan=plan, attn_implementation=attn)
            want = assert_matches(model, oracle, probe_ids(), mask, want=want,
                                  generate=attn == "sdpa" or what == "mixed")
        pads = sum(len(sp["pad"]) for sp in model.config.gisp_layers)
        assert decoder_linear_params(model) == plan.kept_params + pads * shape.q_head_params
        if what == "mixed":
            assert type(model.model.layers[0].self_attn).__name__ == "EmptyAttention"
            assert type(model.model.layers[0].mlp).__name__ == "EmptyMLP"
            expected = ({"q_heads": 4, "kv_heads": 2, "intermediate": 0, "pad": [3]} if shape.is_gqa else
                        {"q_heads": 3, "kv_heads": 3, "intermediate": 0, "pad": []})
            assert model.config.gisp_layers[1] == expected
            assert pads == (1 if shape.is_gqa else 0)


def test_group_of_four_padding_layout(sources):
    """8 heads over 2 KV heads: keeping 3 + 1 pads group 1 with 2 zero heads; 1 + 4 pads group 0 with 3."""
    src = sources("llama-gqa", num_attention_heads=8, num_key_value_heads=2)
    shape = src.shape
    plan = hand_plan(shape, [([0, 1, 2, 5], None), ([3, 4, 5, 6, 7], [1, 2]), ([], None), ([4], [])])
    model = load(src.artifact, plan=plan)
    assert [sp["q_heads"] for sp in model.config.gisp_layers] == [6, 8, 0, 1]
    assert [sp["pad"] for sp in model.config.gisp_layers] == [[4, 5], [1, 2, 3], [], []]
    assert decoder_linear_params(model) == plan.kept_params + 5 * shape.q_head_params
    attn = model.model.layers[1].self_attn
    hd = shape.head_dim
    assert attn.num_key_value_groups == 4 and not attn.q_proj.weight[hd:4 * hd].any()
    assert not attn.o_proj.weight[:, hd:4 * hd].any()
    torch.testing.assert_close(attn.q_proj.weight[:hd], src.dense.model.layers[1].self_attn.q_proj.weight[3 * hd:4 * hd],
                               atol=0, rtol=0)
    assert_matches(model, src.oracle(plan), probe_ids())


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa"])
def test_padding_heads_read_from_the_file_map_a_padded_group(sources, name, monkeypatch):
    """Heads 0 + 4..7 of 8 over 2 KV heads: group 0's 3 padding heads take the file's heads 1..3 (their outputs
    meet o_proj's zero columns), so q_proj (and Qwen2's q bias) is one run of the file's rows, mapped, not
    copied; the slice still computes what the oracle does."""
    src = sources(name, num_attention_heads=8, num_key_value_heads=2)
    plan = hand_plan(src.shape, [([0, 4, 5, 6, 7], None), ([0, 1, 2, 3], None), ([], None), ([5], [])])
    copied = []
    read_into = ShardFile.read_into
    monkeypatch.setattr(ShardFile, "read_into", lambda self, name, *a, **k: copied.append(name) or read_into(
        self, name, *a, **k))
    model = load(src.artifact, plan=plan)
    assert [sp["pad"] for sp in model.config.gisp_layers] == [[1, 2, 3], [], [], []]
    assert "model.layers.0.self_attn.o_proj.weight" in copied  # its padding columns must be zeros
    assert not [n for n in copied if n.startswith("model.layers.0.self_attn.q_proj")]  # mapped
    attn, dense = model.model.layers[0].self_attn, src.dense.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, dense.q_proj.weight)  # padding rows included: they are the file's heads 1..3
    if attn.q_proj.bias is not None:
        assert torch.equal(attn.q_proj.bias, dense.q_proj.bias)
    hd = src.shape.head_dim
    assert not attn.o_proj.weight[:, hd:4 * hd].any()
    assert_matches(model, src.oracle(plan), probe_ids())


# ---- checkpoint variants: tied embeddings, bias everywhere, sharded bf16 weights of the example model
def test_tied_embeddings_and_biases(sources):
    src = sources("llama-gqa", tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    shape = src.shape
    assert shape.o_bias and shape.mlp_bias and shape.q_bias
    for plan in (plan_slice(src.artifact.ranking, 0.4), hand_plan(shape, extreme_plans(shape)["mixed"])):
        model = load(src.artifact, plan=plan)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        params = list(model.parameters())  # as from_pretrained gives them: trainable, no meta left
        assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad and not p.is_meta for p in params)
        assert decoder_linear_params(model) == plan.kept_params + padding_params(plan)
        assert_matches(model, src.oracle(plan), probe_ids())


def test_sliding_window_cache_with_empty_layers(sources):
    """Mistral with a window shorter than prompt + generation: the cache stub of an attention-less layer
    must keep the sliding-window bookkeeping right."""
    src = sources("mistral-gqa", sliding_window=5)
    for layers in extreme_plans(src.shape).values():
        plan = hand_plan(src.shape, layers)
        assert_matches(load(src.artifact, plan=plan), src.oracle(plan), probe_ids(2, 9))


def test_sharded_bf16_example_model(tmp_path):
    """The real example model: 3 shards + index, bf16, weights referenced not copied."""
    from transformers import AutoConfig

    shape = ModelShape.from_config(AutoConfig.from_pretrained(EXAMPLE_MODEL))
    ranking = prune(None, shape, None, PruneConfig(method="random", max_sparsity=0.5))
    art = load_artifact(write_artifact(tmp_path / "a", EXAMPLE_MODEL, ranking, {"method": "random"},
                                       copy_weights=False))
    plan = plan_slice(art.ranking, 0.4)
    model = load(art, 0.4, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert decoder_linear_params(model) == plan.kept_params + padding_params(plan)
    with safe_open(str(EXAMPLE_MODEL / "model-00001-of-00003.safetensors"), framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith("mlp.down_proj.weight"))
        layer = int(name.split(".")[2])
        want = f.get_tensor(name)[:, list(plan.layers[layer].channels)]
    assert torch.equal(model.get_submodule(name.rsplit(".", 1)[0]).weight, want)  # gathers are bit-exact
    fp32 = load(art, plan=plan)
    oracle = dense_model(EXAMPLE_MODEL)
    apply_oracle(oracle, plan)
    assert_matches(fp32, oracle, probe_ids(1, 8), atol=1e-4)  # logits of a trained model are ~10


# ---- the config round-trips: the next step exports it as config.json
def test_config_roundtrip(sources, tmp_path):
    from transformers import AutoConfig

    src = sources("qwen2-gqa")
    plan = hand_plan(src.shape, extreme_plans(src.shape)["mixed"])
    model = load(src.artifact, plan=plan)
    assert json.loads(model.config.to_json_string())["gisp_layers"] == model.config.gisp_layers
    model.config.save_pretrained(tmp_path)
    rebuilt = build_model(AutoConfig.from_pretrained(tmp_path))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_building_on_meta_skips_random_init_and_puts_it_back(sources):
    """build_model turns torch.nn.init's random draws off while it builds (meta tensors need none), and back on."""
    import torch

    src = sources("llama-gqa")
    plan = hand_plan(src.shape, extreme_plans(src.shape)["mixed"])
    before = {name: getattr(torch.nn.init, name) for name in ("uniform_", "normal_", "kaiming_uniform_")}
    config = load(src.artifact, plan=plan).config
    assert {name: getattr(torch.nn.init, name) for name in before} == before
    assert all(p.is_meta for p in build_model(config).parameters())
    torch.manual_seed(0)
    assert torch.nn.Linear(8, 8).weight.std() > 0  # a model built afterwards is initialised as usual


# ---- gathers and errors
@pytest.mark.parametrize("name", ["qwen2-gqa", "llama-mha", "qwen3-gqa"])
def test_device_gathers_equal_positioned_reads(sources, name, monkeypatch):
    """The CUDA load path (dense tensors read whole, ragged kernel gathers over several layers per launch), run
    here on CPU tensors through Triton's interpreter: the same state dict, bit for bit, as the CPU path, with
    empty layers, padded groups and biases; the whole model in one launch per kind, or one round per budget."""
    gather = pytest.importorskip("gisp_deploy.kernels.gather")
    if not (gather.HAS_TRITON and gather.interpreting()):
        pytest.skip("needs triton (run under TRITON_INTERPRET=1, as tests/conftest.py sets)")
    from gisp_deploy.slicing import loader

    src = sources(name)
    calls = []
    for fn in ("gather_rows", "gather_cols"):
        real = getattr(gather, fn)
        monkeypatch.setattr(gather, fn, lambda ws, ks, _real=real, _fn=fn, **kw: calls.append((_fn, len(ws)))
                            or _real(ws, ks, **kw))
    plans = [hand_plan(src.shape, layers) for layers in extreme_plans(src.shape).values()]
    plans.append(plan_slice(src.artifact.ranking, 0.4))
    for plan in plans:
        want = load(src.artifact, plan=plan).state_dict()
        calls.clear()
        got = load(src.artifact, plan=plan, gather="device").state_dict()
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
        assert [fn for fn, _ in calls] in (["gather_rows", "gather_cols"], ["gather_rows"], ["gather_cols"], [])
    calls.clear()
    monkeypatch.setattr(loader, "GATHER_BUDGET", 1)  # every tensor its own round: as many launches as tensors
    plan = plans[-1]
    got = load(src.artifact, plan=plan, gather="device").state_dict()
    assert len(calls) > 2 * src.shape.num_layers and all(n == 1 for _, n in calls)
    for key, t in load(src.artifact, plan=plan).state_dict().items():
        assert torch.equal(got[key], t), key
    with pytest.raises(ValueError, match="choose auto or device"):
        load(src.artifact, plan=plan, gather="gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FAMILIES))
def test_cuda_slices_equal_the_cpu_ones(sources, name):
    """On CUDA, cut on the host and uploaded (the default) or gathered on the device: the CPU slice, bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    src = sources(name)
    for s in (0.0, 0.35, 0.7):
        want = load(src.artifact, s).state_dict()
        for gather in ("auto", "device"):
            got = load(src.artifact, s, device="cuda", gather=gather).state_dict()
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].is_cuda and torch.equal(got[key].cpu(), want[key]), (s, gather, key)


def test_errors_and_lazy_export(sources):
    import gisp_deploy

    assert gisp_deploy.load is load
    src = sources("llama-gqa")
    with pytest.raises(SparsityError, match="beyond what this artifact covers"):
        load(src.artifact, 0.9)
    with pytest.raises(ValueError, match="pass a sparsity, a plan or a budget"):
        load(src.artifact)
    model = load(str(src.artifact.path), 0.3)  # a path works too
    assert not model.training and model.generation_config.pad_token_id == 2


def test_a_failed_copy_fails_the_load(sources, monkeypatch):
    """A read that fails in a copy thread (here: every o_proj's) is load's error, after every thread ended."""
    import threading

    src = sources("llama-gqa")
    read_into = ShardFile.read_into

    def failing(self, name, *a, **k):
        if name.endswith("o_proj.weight"):
            raise ArtifactError(f"{self.path}: the file ended early; it is truncated, restore it")
        return read_into(self, name, *a, **k)

    monkeypatch.setattr(ShardFile, "read_into", failing)
    before = threading.active_count()
    with pytest.raises(ArtifactError, match="truncated"):
        load(src.artifact, plan=hand_plan(src.shape, extreme_plans(src.shape)["mixed"]))  # uneven groups: copied
    assert threading.active_count() == before


# ---- the sliced tensors are begun from the checkpoint's own index, before the model is built
def _artifact_with_weights(tmp_path, edit):
    """A llama-gqa model whose weights file `edit(tensors)` changed, its random-ranking artifact and its dense model
    (loaded before the edit)."""
    from safetensors.torch import load_file, save_file

    from tests.factory import make_model_dir

    model_dir = make_model_dir(tmp_path, "llama-gqa")
    dense = dense_model(model_dir)
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    shape = ModelShape.from_config(dense.config)
    ranking = prune(None, shape, None, PruneConfig(method="random", max_sparsity=0.7, protect_first=0,
                                                   protect_last=0))
    return load_artifact(write_artifact(tmp_path / "art", model_dir, ranking, {"method": "random"})), dense


def test_checkpoint_tensors_the_slice_has_no_place_for_are_dropped(tmp_path):
    """Layer tensors that no compact layer asks for (a q_proj bias this config has none of, a layer beyond the
    config's, the projections of a layer that keeps nothing) are read or not, and left out: the slice is exact."""
    def edit(t):
        t["model.layers.1.self_attn.q_proj.bias"] = torch.ones(32)
        t["model.layers.7.self_attn.q_proj.weight"] = torch.ones(32, 32)

    art, dense = _artifact_with_weights(tmp_path, edit)
    plan = hand_plan(art.shape, extreme_plans(art.shape)["mixed"])  # layer 0 keeps nothing; uneven groups copied
    model = load(art, plan=plan)
    assert "model.layers.1.self_attn.q_proj.bias" not in dict(model.named_parameters())
    apply_oracle(dense, plan)
    assert_matches(model, dense, probe_ids(), generate=False)


def test_a_checkpoint_smaller_than_its_ranking_fails_before_reading(tmp_path, monkeypatch):
    """A q_proj with fewer rows than the slice keeps is one ArtifactError naming the tensor, raised before a copy
    begins (ShardFile.read_into never called)."""
    def edit(t):
        t["model.layers.1.self_attn.q_proj.weight"] = t["model.layers.1.self_attn.q_proj.weight"][:16].clone()

    art, _ = _artifact_with_weights(tmp_path, edit)
    reads = []
    monkeypatch.setattr(ShardFile, "read_into", lambda self, name, *a, **k: reads.append(name))
    with pytest.raises(ArtifactError, match=r"layers\.1\.self_attn\.q_proj\.weight: the slice keeps entry \d+ along "
                                            r"dim 0, the checkpoint has 16"):
        load(art, plan=hand_plan(art.shape, extreme_plans(art.shape)["mixed"]))
    assert reads == []


def test_copies_split_the_staging_bytes_between_threads():
    """Every read runs holding a staging buffer no other running read has, STAGING_BYTES / READ_THREADS, and there
    are READ_THREADS of them: the loader's peak memory bound (compact model + STAGING_BYTES) does not grow with reads."""
    import threading
    import time

    from gisp_deploy.safetensors_file import STAGING_BYTES
    from gisp_deploy.slicing.loader import READ_THREADS, CopyPool

    held, seen, lock = set(), set(), threading.Lock()

    class Reader:
        def read_into(self, key, out, positions, dim, staging, zeroed):
            assert zeroed and staging.nbytes == STAGING_BYTES // READ_THREADS
            with lock:
                assert id(staging) not in held  # no two running reads share one
                held.add(id(staging))
                seen.add(id(staging))
            time.sleep(0.01)  # long enough for the reads to overlap
            out.fill_(1)
            with lock:
                held.discard(id(staging))

    outs = [torch.zeros(3) for _ in range(4 * READ_THREADS)]
    with CopyPool() as copies:
        copies.read(Reader(), [("w", out, None, 0) for out in outs])
        copies.wait()
    assert len(seen) == READ_THREADS and all(bool(o.eq(1).all()) for o in outs)


def test_a_source_order_artifact_is_told_once_how_to_load_faster(tmp_path, capsys):
    """Loading a source-order artifact on the CPU says once (per process) that `gisp-deploy reorder` makes its
    slices mapped views; a rank-ordered artifact, or a slice that keeps everything (mapped anyway), says nothing."""
    from gisp_deploy.pruning.reorder import reorder

    art, _ = _artifact_with_weights(tmp_path, lambda tensors: None)
    load(art, 0.0)
    assert "notice:" not in capsys.readouterr().err
    for s in (0.3, 0.5):
        load(art, s)
    err = capsys.readouterr().err
    assert err.count("notice:") == 1 and f"gisp-deploy reorder {art.path} --out DIR" in err, err
    ranked = load_artifact(reorder(art.path, tmp_path / "ranked"))
    capsys.readouterr()
    load(ranked, 0.3)
    assert "notice:" not in capsys.readouterr().err
