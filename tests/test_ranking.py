import numpy as np
import pytest
import torch

from gisp_deploy.families import ModelShape
from gisp_deploy.plan import plan_slice
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.arguments import SparsityError, parse_sparsities
from gisp_deploy.ranking import CHANNEL, HEAD, Ranking
from tests.factory import make_model_dir


def _load(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, ModelShape.from_config(model.config)


@pytest.fixture(scope="module", params=["llama-mha", "llama-gqa", "qwen2-gqa"])
def ranked(request, tmp_path_factory):
    model, shape = _load(make_model_dir(tmp_path_factory.mktemp("m"), request.param))
    cfg = PruneConfig(method="magnitude", unit="q_head", max_sparsity=0.6, protect_first=0.25, protect_last=0)
    return model, shape, prune(model, shape, None, cfg), cfg


def test_every_structure_exactly_once(ranked):
    _, shape, ranking, _ = ranked
    seen = set(zip(ranking.layer.tolist(), ranking.kind.tolist(), ranking.index.tolist()))
    expected = {(l, HEAD, h) for l in range(shape.num_layers) for h in range(shape.num_heads)}
    expected |= {(l, CHANNEL, c) for l in range(shape.num_layers) for c in range(shape.intermediate)}
    assert seen == expected and len(ranking) == len(expected)


def test_slices_nested_at_random_sparsities(ranked):
    _, shape, ranking, _ = ranked
    rng = np.random.default_rng(0)
    sps = sorted(rng.uniform(0, ranking.coverage, 50))
    plans = [plan_slice(ranking, s) for s in sps]
    for small, big in zip(plans, plans[1:]):
        for a, b in zip(small.layers, big.layers):
            assert set(b.q_heads) <= set(a.q_heads)
            assert set(b.kv_heads) <= set(a.kv_heads)
            assert set(b.channels) <= set(a.channels)
    for s, p in zip(sps, plans):
        assert p.achieved_sparsity >= s - 1e-12


def test_achieved_sparsity_matches_independent_count(ranked):
    """Slice the real weight tensors by the plan and count what is left."""
    model, shape, ranking, _ = ranked
    hd = shape.head_dim
    total = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                for layer in model.model.layers for m in (*[getattr(layer.self_attn, n) for n in
                                                             ("q_proj", "k_proj", "v_proj", "o_proj")],
                                                           layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
    assert total == shape.total_params
    for s in (0.0, 0.13, 0.3, 0.5, ranking.coverage):
        plan = plan_slice(ranking, s)
        kept = 0
        for layer, lp in zip(model.model.layers, plan.layers):
            a, m = layer.self_attn, layer.mlp
            q_rows = torch.tensor([h * hd + d for h in lp.q_heads for d in range(hd)], dtype=torch.long)
            kv_rows = torch.tensor([h * hd + d for h in lp.kv_heads for d in range(hd)], dtype=torch.long)
            ch = torch.tensor(lp.channels, dtype=torch.long)
            for lin, idx, dim in ((a.q_proj, q_rows, 0), (a.k_proj, kv_rows, 0), (a.v_proj, kv_rows, 0),
                                  (a.o_proj, q_rows, 1), (m.gate_proj, ch, 0), (m.up_proj, ch, 0),
                                  (m.down_proj, ch, 1)):
                kept += lin.weight.index_select(dim, idx).numel()
                if lin.bias is not None:
                    kept += lin.bias.numel() if dim == 1 else lin.bias.index_select(0, idx).numel()
        assert plan.achieved_sparsity == pytest.approx(1 - kept / total, abs=1e-12)
        assert plan.kept_params == kept


def test_protected_layers_keep_everything_within_coverage(ranked):
    _, shape, ranking, cfg = ranked
    plan = plan_slice(ranking, ranking.coverage)
    for layer in cfg.protected_layers(shape.num_layers):
        lp = plan.layers[layer]
        assert len(lp.q_heads) == shape.num_heads and len(lp.channels) == shape.intermediate
    assert set(ranking.layer[: ranking.num_covered].tolist()).isdisjoint(cfg.protected_layers(shape.num_layers))


def test_sparsity_errors(ranked):
    _, _, ranking, _ = ranked
    for bad in ("-0.1", "nan", "1.0", "abc", ""):
        with pytest.raises(SparsityError):
            parse_sparsities(bad)
    with pytest.raises(SparsityError, match="beyond what this artifact covers"):
        plan_slice(ranking, min(0.99, ranking.coverage + 0.05))


def test_save_load_roundtrip(ranked, tmp_path):
    _, shape, ranking, _ = ranked
    ranking.save(tmp_path / "r.safetensors")
    back = Ranking.load(tmp_path / "r.safetensors", shape)
    for col in ("layer", "kind", "index", "step", "params"):
        np.testing.assert_array_equal(getattr(back, col), getattr(ranking, col))
    np.testing.assert_allclose(back.score, ranking.score, rtol=1e-6)
    assert back.num_covered == ranking.num_covered and back.coverage == ranking.coverage
    # the format stays compact: about 17 bytes per structure
    assert (tmp_path / "r.safetensors").stat().st_size < 17 * len(ranking) + 1024


def test_kv_group_unit_removes_whole_groups(tmp_path):
    model, shape = _load(make_model_dir(tmp_path, "llama-gqa"))
    ranking = prune(model, shape, None, PruneConfig(method="random", unit="kv_group", max_sparsity=0.5))
    for s in (0.1, 0.3, 0.5):
        for lp in plan_slice(ranking, s).layers:
            assert len(lp.q_heads) == len(lp.kv_heads) * shape.group_size


@pytest.mark.parametrize("unit", ["q_head", "kv_group"])
def test_deployment_rounding_keeps_slices_nested(tmp_path, unit):
    from gisp_deploy.plan import RoundingError

    model, shape = _load(make_model_dir(tmp_path, "llama-gqa", num_attention_heads=8, num_key_value_heads=4,
                                        head_dim=4, intermediate_size=96))
    ranking = prune(model, shape, None, PruneConfig(method="random", unit=unit, max_sparsity=0.7, protect_first=0,
                                                    protect_last=0, seed=3))
    sps = np.linspace(0, ranking.coverage, 25)
    for tp, cm in ((2, 1), (2, 16), (4, 32), (1, 64)):
        plans = [plan_slice(ranking, s, tp_size=tp, channel_multiple=cm) for s in sps]
        for s, p in zip(sps, plans):
            plain = plan_slice(ranking, s)
            assert p.achieved_sparsity <= plain.achieved_sparsity + 1e-12
            assert p.achieved_sparsity == pytest.approx(1 - p.kept_params / shape.total_params)
            for lp, base in zip(p.layers, plain.layers):
                assert set(base.q_heads) <= set(lp.q_heads) and set(base.channels) <= set(lp.channels)
                assert len(lp.channels) % (cm * tp // np.gcd(cm, tp)) == 0 or len(lp.channels) == shape.intermediate
                if lp.q_heads:
                    groups = np.bincount([h // shape.group_size for h in lp.q_heads])
                    kv, padded = np.count_nonzero(groups), np.count_nonzero(groups) * groups.max()
                    assert padded % tp == 0 and (kv % tp == 0 or tp % kv == 0)
        for small, big in zip(plans, plans[1:]):
            for a, b in zip(small.layers, big.layers):
                assert set(b.q_heads) <= set(a.q_heads) and set(b.channels) <= set(a.channels)
    with pytest.raises(RoundingError, match="tensor-parallel size 3"):
        plan_slice(ranking, 0.0, tp_size=3)
    with pytest.raises(RoundingError, match="positive integer"):
        plan_slice(ranking, 0.3, tp_size=0)


SAVE_IN_A_FRESH_PROCESS = """
import sys
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.methods import PruneConfig, prune
from tests.factory import tiny_config
shape = ModelShape.from_config(tiny_config("llama"))
prune(None, shape, None, PruneConfig(method="random", max_sparsity=0.6, protect_first=0)).save(sys.argv[1])
"""


def test_saved_bytes_are_reproducible_across_processes(tmp_path):
    """The same ranking saved by two processes is the same file (so its sha256 in the manifest is too)."""
    import subprocess
    import sys

    from tests.factory import ROOT

    paths = [tmp_path / f"r{k}.safetensors" for k in range(3)]
    for k, p in enumerate(paths):
        env = {"PYTHONHASHSEED": str(k), "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-c", SAVE_IN_A_FRESH_PROCESS, str(p)], check=True, cwd=ROOT, env=env)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()


def test_rankings_written_with_two_metadata_keys_still_load(ranked, tmp_path):
    from safetensors.torch import load_file, save_file

    _, shape, ranking, _ = ranked
    ranking.save(tmp_path / "new.safetensors")
    save_file(load_file(tmp_path / "new.safetensors"), tmp_path / "old.safetensors",
              metadata={"num_covered": str(ranking.num_covered), "unit": ranking.unit})
    back = Ranking.load(tmp_path / "old.safetensors", shape)
    assert back.num_covered == ranking.num_covered and back.unit == ranking.unit


def test_kept_structures_of_hand_removals():
    """Removals -> what each layer keeps: a query head alone, a KV group's heads together, channels."""
    from gisp_deploy.plan import kept_structures
    from tests.factory import tiny_config

    shape = ModelShape.from_config(tiny_config("llama"))  # 4 layers, 4 heads in 2 KV groups, 48 channels
    removed = [(0, HEAD, 3), (0, CHANNEL, 5), (2, CHANNEL, 0), (2, CHANNEL, 47)]
    kept = kept_structures(shape, "q_head", removed)
    assert kept[0] == ((0, 1, 2), tuple(c for c in range(48) if c != 5))
    assert kept[1] == kept[3] == ((0, 1, 2, 3), tuple(range(48)))
    assert kept[2] == ((0, 1, 2, 3), tuple(range(1, 47)))
    assert kept_structures(shape, "kv_group", [(1, HEAD, 1)])[1][0] == (0, 1)  # group 1 = heads 2 and 3


def test_an_empty_sparsity_item_is_an_error_not_dropped():
    with pytest.raises(SparsityError, match="empty item"):
        parse_sparsities("0.2,,0.4")
    with pytest.raises(SparsityError, match="empty item"):
        parse_sparsities("0.2,0.4,")
    assert parse_sparsities("0.2, 0.4") == [0.2, 0.4]


def test_padded_query_heads_counts_what_the_compact_layer_builds():
    """plan.padded_query_heads (torch-free, for serve's banner) against modeling.layer_layout's padding, for
    every subset of query heads of a layer with 3 KV groups of 2 (uneven groups, empty groups, none at all)."""
    from itertools import combinations

    from gisp_deploy.modeling import layer_layout
    from gisp_deploy.plan import padded_query_heads

    for n in range(7):
        for q in combinations(range(6), n):
            kv = sorted({h // 2 for h in q})
            assert padded_query_heads(q, 2) == len(layer_layout(q, kv, (), 2).q_src), q
