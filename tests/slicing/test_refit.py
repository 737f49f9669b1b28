"""Corrected slices (load(..., refit=)): the loader's streamed correction against the oracle's whole-model one,
for every family and variant; nested slices of one artifact; artifacts without statistics; crafted statistics;
export of corrected weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gisp_deploy.artifact import STATISTICS, ArtifactError, load_artifact
from gisp_deploy.plan import plan_slice
from gisp_deploy.slicing.export import export_slice
from gisp_deploy.slicing.loader import load
from gisp_deploy.slicing.oracle import corrected_oracle
from tests.factory import ATOL, Source, assert_matches, calibration_windows, dense_model, make_model_dir, probe_ids

CALIB = calibration_windows()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """get(name, **overrides) -> Source whose artifact records calibration windows (made once per model)."""
    cache = {}

    def get(name, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(name)
            model_dir = make_model_dir(root, name, **overrides)
            cache[key] = Source(model_dir, dense_model(model_dir), root, "q_head", calibration=CALIB)
        return cache[key]
    return get


def _oracle(src, plan, refit):
    return corrected_oracle(src.dense, plan, CALIB.input_ids, CALIB.attention_mask, refit)


@pytest.mark.parametrize("refit", ["ls", "ec", "ecr"])
@pytest.mark.parametrize("name,overrides", [("llama-gqa", {}), ("llama-mha", {}), ("mistral-gqa", {}),
                                            ("qwen2-gqa", {}), ("qwen3-gqa", {}),
                                            ("llama-gqa", {"attention_bias": True, "mlp_bias": True})])
def test_corrected_slice_is_the_corrected_oracle(calibrated, name, overrides, refit):
    src = calibrated(name, **overrides)
    plan = plan_slice(src.artifact.ranking, 0.4)
    model = load(src.artifact, 0.4, refit=refit)
    assert model.config.gisp_refit["name"] == refit
    oracle = _oracle(src, plan, refit)
    assert_matches(model, oracle, probe_ids(), generate=False)
    plain = _oracle(src, plan, "none")
    with torch.no_grad():  # the correction changed something: the test could fail
        assert (oracle(probe_ids()).logits - plain(probe_ids()).logits).abs().max() > 1e-3


@pytest.mark.parametrize("refit", ["ls", "ec"])
def test_padding_columns_stay_zero(calibrated, refit):
    """Uneven KV groups (dummy heads) and padding channels: only real inputs are refitted."""
    src = calibrated("llama-gqa")
    plan = plan_slice(src.artifact.ranking, 0.5, channel_multiple=8)
    model = load(src.artifact, plan=plan, refit=refit)
    assert any(model.config.gisp_layers[i]["pad"] for i in range(src.shape.num_layers))
    assert_matches(model, _oracle(src, plan, refit), probe_ids(), generate=False)
    for block, spec in zip(model.model.layers, model.config.gisp_layers):
        o = getattr(block.self_attn, "o_proj", None)
        for head in spec["pad"]:
            assert o.weight[:, head * src.shape.head_dim:(head + 1) * src.shape.head_dim].abs().max() == 0


def test_two_sparsities_of_one_artifact(calibrated):
    """Nested slices: each sparsity's corrected slice is its own oracle's, from the one artifact."""
    src = calibrated("qwen2-gqa")
    plans = {s: plan_slice(src.artifact.ranking, s) for s in (0.2, 0.6)}
    for a, b in zip(plans[0.2].layers, plans[0.6].layers):
        assert set(b.q_heads) <= set(a.q_heads) and set(b.channels) <= set(a.channels)
    for s, plan in plans.items():
        assert_matches(load(src.artifact, s, refit="ec"), _oracle(src, plan, "ec"), probe_ids(), generate=True)


def test_ridge_gives_the_plain_slice_back(calibrated):
    src = calibrated("llama-gqa")
    plan = plan_slice(src.artifact.ranking, 0.4)
    model = load(src.artifact, 0.4, refit="ls", ridge=1e12)
    assert_matches(model, _oracle(src, plan, "none"), probe_ids(), generate=False, atol=1e-4)


def test_artifact_without_statistics_loads_plain_with_one_notice(sources, capfd):
    src = sources("llama-gqa")  # written without calibration windows, as before gisp-deploy stored them
    plan = plan_slice(src.artifact.ranking, 0.4)
    first = load(src.artifact, 0.4, refit="ls")
    second = load(src.artifact, 0.4, refit="ec")
    err = capfd.readouterr().err
    assert err.count("no calibration statistics") == 1  # said once; the source-order notice may come too
    assert first.config.gisp_refit is None and second.config.gisp_refit is None
    assert_matches(first, src.oracle(plan), probe_ids(), generate=False)
    with pytest.raises(ValueError, match="choose none, ls, ec"):
        load(src.artifact, 0.4, refit="lsq")


def _copy(src, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(src.artifact.path, out)
    return out


def test_statistics_are_verified_and_bounds_checked(calibrated, tmp_path):
    src = calibrated("llama-gqa")
    art = _copy(src, tmp_path)
    ids, mask = load_artifact(art).statistics()
    assert torch.equal(ids, CALIB.input_ids) and torch.equal(mask, CALIB.attention_mask.bool())
    from safetensors.torch import save_file

    bad = CALIB.input_ids.to(torch.int32).clone()
    bad[0, 0] = 10 ** 6  # a token id outside the vocabulary
    save_file({"input_ids": bad, "attention_mask": CALIB.attention_mask.to(torch.uint8)}, str(art / STATISTICS))
    with pytest.raises(ArtifactError, match="digest"):
        load_artifact(art, verify=False).statistics()
    manifest = json.loads((art / "gisp.json").read_text())  # a crafted artifact whose digests agree
    from gisp_deploy.integrity import sha256_file

    manifest["statistics"]["sha256"] = manifest["files"][STATISTICS] = sha256_file(art / STATISTICS)
    (art / "gisp.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="token ids outside"):
        load_artifact(art).statistics()


def test_export_writes_the_corrected_weights(calibrated, tmp_path):
    from transformers import AutoModelForCausalLM

    src = calibrated("mistral-gqa")
    summary = export_slice(src.artifact, tmp_path / "out", 0.4, refit="ls")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["gisp_refit"]["name"] == "ls" == summary["refit"]["name"]
    assert config["gisp_refit"]["statistics_sha256"] == src.artifact.manifest["statistics"]["sha256"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert exported.model.layers[1].mlp.down_proj.bias is not None
    assert_matches(exported, load(src.artifact, 0.4, refit="ls"), probe_ids(), generate=False, atol=ATOL)


def test_ls_moments_are_reused_for_the_next_slice_of_the_same_artifact(calibrated, monkeypatch):
    from gisp_deploy.slicing import correction

    src = calibrated("qwen3-gqa")
    load(src.artifact, 0.2, refit="ls")  # fills the cache
    calls = []
    monkeypatch.setattr(correction._Stream, "dense_moments", lambda *a: calls.append(a))
    model = load(src.artifact, 0.6, refit="ls")
    assert not calls
    assert_matches(model, _oracle(src, plan_slice(src.artifact.ranking, 0.6), "ls"), probe_ids(), generate=False)
