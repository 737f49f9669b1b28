import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from gisp_deploy.artifact import write_artifact
from gisp_deploy.check import check_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.methods import PruneConfig, prune
from tests.factory import EXAMPLE_HELDOUT, make_model_dir


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
    c = check_artifact(artifact, [0.5, 0.2, 0.4], text=EXAMPLE_HELDOUT, max_ppl_ratio=1e6, seq_len=32,
                       max_tokens=512)
    names = [r.name for r in c.results]
    assert c.ok, [r for r in c.results if not r.ok]
    assert "slices nested" in names and "s=0.4: matches the oracle" in names
    assert "s=0.5: perplexity within 1e+06x dense" in names


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
    c = check_artifact(bad, [0.2])
    failed = [r for r in c.results if not r.ok]
    assert [r.name for r in failed] == ["artifact: weight files sha256"]
    assert "model.safetensors" in failed[0].message and "sha256" in failed[0].message
