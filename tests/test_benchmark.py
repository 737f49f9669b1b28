import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from gisp_deploy.artifact import load_artifact, write_artifact
from gisp_deploy.benchmark import Bench, BenchConfig, decode_bytes, weight_read_params
from gisp_deploy.data import token_stream
from gisp_deploy.evaluate import perplexity
from gisp_deploy.families import ModelShape
from gisp_deploy.methods import PruneConfig, prune
from gisp_deploy.prune_run import load_tokenizer
from gisp_deploy.speed import SpeedConfig
from tests.factory import EXAMPLE_HELDOUT, ROOT, make_model_dir

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _artifact(root, model_dir, method):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    shape = ModelShape.from_config(dense.config)
    ranking = prune(dense, shape, None, PruneConfig(method=method, max_sparsity=0.6, protect_first=0, protect_last=0))
    return write_artifact(root / f"art-{method}", model_dir, ranking, {"method": method})


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model_dir = make_model_dir(root, "llama-gqa", hidden_size=128, head_dim=32, intermediate_size=256)
    return [_artifact(root, model_dir, m) for m in ("magnitude", "random")]


@pytest.fixture(scope="module")
def task(arts, tmp_path_factory):
    from gisp_deploy.tasks import build_continuation_task, write_jsonl

    path = tmp_path_factory.mktemp("task") / "cont.margin.jsonl"
    write_jsonl(build_continuation_task(load_tokenizer(arts[0]), [str(EXAMPLE_HELDOUT)], 24, seed=3), path)
    return path


@pytest.fixture(scope="module")
def records(arts, task):
    cfg = BenchConfig(sparsities=(0.4, 0.2), texts=(str(EXAMPLE_HELDOUT),), seq_lens=(32, 64), tasks=(str(task),),
                      max_tokens=2048)
    return Bench(cfg, log=lambda m: None).run(list(arts))


def test_dense_included_once_per_weights_and_sorted(records):
    assert [(r["method"], r["sparsity"]) for r in records] == \
        [("magnitude", 0.0), ("magnitude", 0.2), ("magnitude", 0.4), ("random", 0.0), ("random", 0.2), ("random", 0.4)]
    dense_a, dense_b = records[0], records[3]
    assert "measured_with" not in dense_a and dense_b["measured_with"] == dense_a["name"]
    assert dense_b["perplexity"] == dense_a["perplexity"]


def test_perplexity_equals_an_independent_measurement(records, arts):
    from transformers import AutoModelForCausalLM

    from gisp_deploy.loader import load

    tok = load_tokenizer(arts[0])
    stream = token_stream(tok, [str(EXAMPLE_HELDOUT)])[:2048]
    dense = AutoModelForCausalLM.from_pretrained(arts[0], dtype=torch.float32)
    got = {(p["text"], p["seq_len"]): p["perplexity"] for p in records[0]["perplexity"]}
    assert got[(EXAMPLE_HELDOUT.name, 64)] == pytest.approx(perplexity(dense, stream, 64)[0], rel=1e-5)
    slice_ppl = perplexity(load(arts[1], 0.4), stream, 32)[0]
    assert records[5]["perplexity"][0]["perplexity"] == pytest.approx(slice_ppl, rel=1e-5)
    assert records[5]["perplexity"][0]["perplexity"] != pytest.approx(got[(EXAMPLE_HELDOUT.name, 32)], rel=1e-3)


def test_sizes_shrink_with_sparsity(records):
    for recs in (records[:3], records[3:]):
        params = [r["parameters"] for r in recs]
        assert params[0] > params[1] > params[2]
        assert [r["decoder_params"] for r in recs][0] == recs[0]["dense_decoder_params"]
        for r in recs:
            assert r["weight_bytes"] == 2 * r["parameters"]  # bfloat16
            assert r["achieved_sparsity"] >= r["sparsity"]
            assert r["load_s"] > 0
            assert r["tasks"][0]["items"] == 24 and 0 <= r["tasks"][0]["accuracy"] <= 1
            assert r["speed"] is None
        assert recs[2]["kv_bytes_per_token"] <= recs[0]["kv_bytes_per_token"]


def test_ideal_speedup_counts_bytes_read():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=100, hidden_size=16, num_attention_heads=2, tie_word_embeddings=False)
    assert weight_read_params(5000, cfg) == 3400
    cfg.tie_word_embeddings = True
    assert weight_read_params(5000, cfg) == 5000
    assert decode_bytes(1000, 64, 2, batch=4, context=10.5) == 2000 + 4 * 10.5 * 64
    assert SpeedConfig(prompt_len=128, gen_len=64).context == 160


def test_report_files_and_plots(records, tmp_path):
    import matplotlib.image

    from gisp_deploy.report import environment, write_json, write_markdown, write_plots

    meta = {"command": "gisp-deploy bench ...", "environment": environment(), "device": "cpu",
            "quality_dtype": "float32", "serve_dtype": "bfloat16"}
    data = json.loads(write_json(tmp_path, records, meta).read_text())
    assert len(data["results"]) == 6
    md = write_markdown(tmp_path, records, meta).read_text()
    assert "## Perplexity, persuasion.txt.gz, 64-token windows" in md and "art-random (random)" in md
    pngs = write_plots(tmp_path, records)
    assert sorted(p.name for p in pngs) == ["accuracy.png", "perplexity.png"]
    img = matplotlib.image.imread(tmp_path / "perplexity.png")
    assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.05  # two panels, not blank


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gisp_deploy.cli", "bench", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_writes_everything(arts, tmp_path):
    p = _cli(arts[0], "--sparsities", "0.3", "--text", EXAMPLE_HELDOUT, "--seq-lens", "32",
             "--max-tokens", "1024", "--out", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert "gisp-deploy bench" in p.stdout and "0.3" in p.stdout
    out = tmp_path / "out"
    assert {f.name for f in out.iterdir()} == {"results.json", "report.md", "perplexity.png"}
    data = json.loads((out / "results.json").read_text())
    assert [r["sparsity"] for r in data["results"]] == [0.0, 0.3]
    assert data["command"].startswith("gisp-deploy bench")


@pytest.mark.parametrize("args, message", [
    (["--sparsities", "0.9"], "beyond what this artifact covers"),
    (["--sparsities", "-0.1"], "sparsit"),
    (["--text", "/nonexistent.txt"], "/nonexistent.txt: no such file"),
    (["--text", str(EXAMPLE_HELDOUT), "--seq-lens", "512"], "max_position_embeddings (256)"),
    (["--seq-lens", "1"], "--seq-lens"),
])
def test_cli_bad_input(arts, tmp_path, args, message):
    p = _cli(arts[0], *args, "--out", tmp_path / "o")
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o" / "results.json").exists()


def test_speed_without_vllm_names_the_fix(arts, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gisp_deploy import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    result = CliRunner().invoke(cli.app, ["bench", str(arts[0]), "--speed", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "gisp-deploy[vllm]" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'gisp-deploy[vllm]')")
def test_speed_on_vllm(arts):
    speed = SpeedConfig(batch_sizes=(1, 2), prompt_len=16, gen_len=4, repeats=1, dtype="float32",
                        enforce_eager=True)
    cfg = BenchConfig(sparsities=(0.5,), serve_dtype="float32", speed=speed)
    dense, half = Bench(cfg, log=lambda m: None).run([arts[1]])
    for rec in (dense, half):
        rows = rec["speed"]["results"]
        assert [r["batch_size"] for r in rows] == [1, 2]
        for r in rows:
            assert r["ttft_s"] > 0 and r["tpot_s"] > 0 and math.isfinite(r["output_tokens_per_s"])
    assert all(r["speedup"] == 1 and r["ideal_speedup"] == 1 for r in dense["speed"]["results"])
    art = load_artifact(arts[1])
    for r in half["speed"]["results"]:
        want = decode_bytes(dense["weight_read_params"], dense["kv_bytes_per_token"], 4, r["batch_size"], 18) / \
            decode_bytes(half["weight_read_params"], half["kv_bytes_per_token"], 4, r["batch_size"], 18)
        assert r["ideal_speedup"] == pytest.approx(want) and r["ideal_speedup"] > 1.2
        assert r["fraction_of_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    assert half["parameters"] < dense["parameters"] and art.shape.num_layers == 4
