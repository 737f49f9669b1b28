"""The rank-ordered layout: the same slices as the original artifact, each one a prefix, loaded as mapped views."""

import json

import pytest
import torch

from gisp_deploy.artifact import MANIFEST, ArtifactError, load_artifact
from gisp_deploy.plan import plan_slice
from gisp_deploy.pruning.reorder import reorder
from gisp_deploy.pruning.run import prune as run_prune
from gisp_deploy.rank_order import is_rank_ordered
from gisp_deploy.slicing.loader import load
from tests.factory import FAMILIES, Source, calibration_windows, dense_model, make_model_dir, probe_ids, run_cli

SPARSITIES = (0.2, 0.45, 0.7)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """get(name, unit) -> (original artifact, its rank-ordered copy), made once."""
    cache = {}

    def get(name, unit="q_head"):
        if (name, unit) not in cache:
            root = tmp_path_factory.mktemp(f"{name}-{unit}")
            model_dir = make_model_dir(root, name)
            src = Source(model_dir, dense_model(model_dir), root, unit, calibration=calibration_windows())
            cache[name, unit] = (src.artifact, load_artifact(reorder(src.artifact.path, root / "ranked")))
        return cache[name, unit]
    return get


@pytest.mark.parametrize("unit", ["q_head", "kv_group"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_reordered_slices_compute_what_the_original_ones_do(pairs, name, unit):
    orig, ranked = pairs(name, unit)
    assert is_rank_ordered(ranked.ranking) and not is_rank_ordered(orig.ranking)
    assert ranked.manifest["layout"] == "rank_ordered" and ranked.manifest["reordered_from"] == orig.digest
    ids = probe_ids()
    g = ranked.shape.group_size
    for s in (0.0, *SPARSITIES):
        plan = plan_slice(ranked.ranking, s)
        assert plan.prefix == plan_slice(orig.ranking, s).prefix
        for lp in plan.layers:  # every slice keeps prefixes
            assert lp.channels == tuple(range(len(lp.channels)))
            assert lp.kv_heads == tuple(range(len(lp.kv_heads)))
            for kv in lp.kv_heads:
                mine = [h - kv * g for h in lp.q_heads if h // g == kv]
                assert mine == list(range(len(mine)))
        with torch.no_grad():
            want = load(orig, s)(ids).logits
            got = load(ranked, s)(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_rounded_slices_stay_prefixes_and_equal(pairs):
    orig, ranked = pairs("llama-gqa")
    ids = probe_ids()
    for kw in ({"tp_size": 2}, {"channel_multiple": 8}):
        plan = plan_slice(ranked.ranking, 0.45, **kw)
        assert all(lp.channels == tuple(range(len(lp.channels))) for lp in plan.layers)
        with torch.no_grad():
            torch.testing.assert_close(load(ranked, 0.45, **kw)(ids).logits, load(orig, 0.45, **kw)(ids).logits,
                                       atol=1e-5, rtol=0)


def test_refit_slices_equal_too(pairs):
    orig, ranked = pairs("qwen2-gqa")
    ids = probe_ids()
    with torch.no_grad():
        torch.testing.assert_close(load(ranked, 0.45, refit="ls")(ids).logits, load(orig, 0.45, refit="ls")(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_rank_ordered_slices_are_views_of_the_file_and_writes_stay_private(pairs):
    orig, ranked = pairs("llama-gqa")
    model = load(ranked, 0.45)  # the checkpoint is fp32, as the slice: no conversion, so views
    mlp = model.model.layers[1].mlp
    dense_i = ranked.shape.intermediate
    gate, down = mlp.gate_proj.weight, mlp.down_proj.weight
    assert gate.untyped_storage().nbytes() > gate.numel() * gate.element_size()  # a window on the whole file
    assert down.stride() == (dense_i, 1) and down.shape[1] < dense_i  # a column prefix, rows dense-wide apart
    plain = load(orig, 0.45).model.layers[1].mlp.gate_proj.weight  # random ranking: scattered rows, copied
    assert plain.untyped_storage().nbytes() == plain.numel() * plain.element_size()
    before = gate.clone()
    with torch.no_grad():
        gate.mul_(3)
        down.zero_()
    ranked.verify_weights(use_record=False)  # the file is untouched
    assert torch.equal(load(ranked, 0.45).model.layers[1].mlp.gate_proj.weight, before)


def test_prune_rank_ordered_is_reorder_of_prune(tmp_path):
    model_dir = make_model_dir(tmp_path, "llama-gqa")
    common = dict(method="random", max_sparsity=0.6, protect_first=0, protect_last=0, log=lambda m: None)
    run_prune(str(model_dir), out=tmp_path / "plain", rank_ordered=False, **common)
    run_prune(str(model_dir), out=tmp_path / "direct", **common)  # the default when weights are copied
    reorder(tmp_path / "plain", tmp_path / "after")
    direct, after = (json.loads((tmp_path / n / MANIFEST).read_text()) for n in ("direct", "after"))
    assert direct["weights"]["sha256"] == after["weights"]["sha256"]
    assert direct["ranking_sha256"] == after["ranking_sha256"] and direct["layout"] == "rank_ordered"
    with pytest.raises(ArtifactError, match="rank-ordered already"):
        reorder(tmp_path / "direct", tmp_path / "again")
    with pytest.raises(ArtifactError, match="no-copy-weights"):
        run_prune(str(model_dir), out=tmp_path / "ref", rank_ordered=True, copy_weights=False, **common)
    assert not (tmp_path / "again").exists() and not (tmp_path / "ref").exists()
    run_prune(str(model_dir), out=tmp_path / "ref", copy_weights=False, **common)  # a reference keeps the order
    assert load_artifact(tmp_path / "ref").manifest.get("layout") is None


def test_reorder_command(pairs, tmp_path):
    orig, ranked = pairs("llama-gqa")
    r = run_cli("reorder", orig.path, "--out", ranked.path)
    assert r.returncode != 0 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("reorder", tmp_path / "missing", "--out", tmp_path / "x")
    assert r.returncode != 0 and r.stderr.startswith("error:") and not (tmp_path / "x").exists()
    r = run_cli("reorder", ranked.path, "--out", tmp_path / "y")
    assert r.returncode != 0 and "rank-ordered already" in r.stderr
    assert "gisp-deploy reorder" in run_cli("reorder", "--help").stdout


def test_device_gather_path_takes_row_prefixes_from_the_file(pairs):
    gather = pytest.importorskip("gisp_deploy.kernels.gather")
    if not (gather.HAS_TRITON and gather.interpreting()):
        pytest.skip("needs triton (run under TRITON_INTERPRET=1, as tests/conftest.py sets)")
    orig, ranked = pairs("qwen2-gqa")
    want = load(orig, 0.45).state_dict()
    got = load(ranked, 0.45, gather="device")
    ids = probe_ids()
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, load(orig, 0.45)(ids).logits, atol=1e-5, rtol=0)
    assert got.state_dict().keys() == want.keys()


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FAMILIES))
def test_cuda_loads_of_a_rank_ordered_artifact_equal_the_cpu_ones(pairs, name):
    """Cut on the host and uploaded (its default on CUDA) or gathered on the device: the CPU slice, bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _, ranked = pairs(name)
    for s in SPARSITIES:
        want = load(ranked, s).state_dict()
        for gather in ("auto", "device"):
            got = load(ranked, s, device="cuda", gather=gather).state_dict()
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].is_cuda and torch.equal(got[key].cpu(), want[key]), (s, gather, key)
