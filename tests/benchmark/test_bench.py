import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from gisp_deploy.artifact import write_artifact
from gisp_deploy.benchmark.bench import Bench, BenchConfig
from gisp_deploy.budget import weight_read_params
from gisp_deploy.benchmark.speed import SpeedConfig
from gisp_deploy.data import token_stream
from gisp_deploy.families import ModelShape
from gisp_deploy.hf import load_tokenizer
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.quality.evaluate import perplexity
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
    from gisp_deploy.quality.tasks import build_continuation_task, write_jsonl

    path = tmp_path_factory.mktemp("task") / "cont.margin.jsonl"
    write_jsonl(build_continuation_task(load_tokenizer(arts[0]), [str(EXAMPLE_HELDOUT)], 24, seed=3), path)
    return path


@pytest.fixture(scope="module")
def records(arts, task):
    cfg = BenchConfig(sparsities=(0.4, 0.2), texts=(str(EXAMPLE_HELDOUT),), seq_lens=(32, 64), tasks=(str(task),),
                      max_tokens=2048)
    return Bench(cfg, log=lambda m: None).run(list(arts))


def _of(records, measure):
    return [r for r in records if r["measure"] == measure]


def _ppl(records, artifact, sparsity, seq_len):
    (r,) = [r for r in _of(records, "perplexity")
            if r["artifact"] == str(artifact) and r["sparsity"] == sparsity and r["seq_len"] == seq_len]
    return r["perplexity"]


def test_dense_included_once_per_weights_and_sorted(records):
    sizes = _of(records, "size")
    assert [(r["method"], r["sparsity"]) for r in sizes] == \
        [("magnitude", 0.0), ("magnitude", 0.2), ("magnitude", 0.4), ("random", 0.0), ("random", 0.2), ("random", 0.4)]
    dense_a = [r for r in records if r["name"] == "art-magnitude" and r["sparsity"] == 0]
    dense_b = [r for r in records if r["name"] == "art-random" and r["sparsity"] == 0]
    assert all("measured_with" not in r for r in dense_a) and all(r["measured_with"] == "art-magnitude" for r in dense_b)
    assert [(r["measure"], r.get("perplexity")) for r in dense_b] == [(r["measure"], r.get("perplexity")) for r in dense_a]
    assert {r["measure"] for r in records} == {"size", "perplexity", "accuracy"}  # one record per measurement
    assert all({"artifact", "name", "method", "sparsity", "achieved_sparsity"} <= set(r) for r in records)


def test_perplexity_equals_an_independent_measurement(records, arts):
    from transformers import AutoModelForCausalLM

    from gisp_deploy.slicing.loader import load

    tok = load_tokenizer(arts[0])
    stream = token_stream(tok, [str(EXAMPLE_HELDOUT)])[:2048]
    dense = AutoModelForCausalLM.from_pretrained(arts[0], dtype=torch.float32)
    assert _ppl(records, arts[0], 0.0, 64) == pytest.approx(perplexity(dense, stream, 64)[0], rel=1e-5)
    slice_ppl = perplexity(load(arts[1], 0.4), stream, 32)[0]
    assert _ppl(records, arts[1], 0.4, 32) == pytest.approx(slice_ppl, rel=1e-5)
    assert _ppl(records, arts[1], 0.4, 32) != pytest.approx(_ppl(records, arts[0], 0.0, 32), rel=1e-3)


def test_sizes_shrink_with_sparsity(records):
    sizes = _of(records, "size")
    for recs in (sizes[:3], sizes[3:]):
        params = [r["parameters"] for r in recs]
        assert params[0] > params[1] > params[2]
        assert recs[0]["decoder_params"] == recs[0]["dense_decoder_params"] > recs[1]["decoder_params"]
        for r in recs:
            assert r["weight_bytes"] == 2 * r["parameters"]  # bfloat16
            assert r["achieved_sparsity"] >= r["sparsity"]
            assert r["load_s"] > 0
        assert recs[2]["kv_bytes_per_token"] <= recs[0]["kv_bytes_per_token"]
    accuracy = _of(records, "accuracy")
    assert len(accuracy) == 6 and all(r["items"] == 24 and 0 <= r["accuracy"] <= 1 for r in accuracy)


def test_bytes_read_per_decode_step_count_the_real_model(arts):
    """The weights a decode step reads are the model's parameters but the input embedding table (one row per
    token), counted here from a real model, untied and tied."""
    from transformers import AutoModelForCausalLM

    for tie in (False, True):
        cfg = AutoModelForCausalLM.from_pretrained(arts[0]).config
        cfg.tie_word_embeddings = tie
        model = AutoModelForCausalLM.from_config(cfg)
        every = {id(p): p.numel() for p in model.parameters()}  # a tied table counts once
        embedding = model.get_input_embeddings().weight
        read = sum(every.values()) - (0 if tie else embedding.numel())
        assert weight_read_params(sum(every.values()), cfg) == read
    assert SpeedConfig(prompt_len=128, gen_len=64).context == 128 + 64 / 2


def test_report_files_and_plots(records, tmp_path):
    import matplotlib.image

    from gisp_deploy.benchmark.report import environment, write_results, write_markdown, write_plots

    meta = {"command": "gisp-deploy bench ...", "environment": environment(), "device": "cpu",
            "quality_dtype": "float32", "serve_dtype": "bfloat16"}
    data = json.loads(write_results(tmp_path, records, meta).read_text())
    assert data["results"] == json.loads(json.dumps(records)) and len(data["results"]) == 6 * 4  # size, 2 ppl, accuracy
    md = write_markdown(tmp_path, records, meta).read_text()
    assert "## Perplexity, persuasion.txt.gz, 64-token windows" in md and "art-random (random)" in md
    pngs = write_plots(tmp_path, records)
    assert sorted(p.name for p in pngs) == ["accuracy.png", "perplexity.png"]
    img = matplotlib.image.imread(tmp_path / "perplexity.png")
    assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.05  # two panels, not blank


def _outside_every_panel(fig) -> bool:
    """The figure's legend overlaps none of its panels (drawn first, so that boxes are final)."""
    fig.draw_without_rendering()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    return all(ax.get_legend() is None and not box.overlaps(ax.get_window_extent()) for ax in fig.axes)


def _tick_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]


def test_accuracy_plot_has_chance_line_and_intervals(records):
    from matplotlib.container import ErrorbarContainer

    from gisp_deploy.benchmark.report import figures, wilson_interval

    fig = figures(records)["accuracy.png"]
    (ax,) = fig.axes  # one task
    chance = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--" and set(ln.get_ydata()) == {0.25}]
    assert len(chance) == 1 and "chance" in chance[0].get_label()  # 4 choices
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in bars] == ["art-magnitude (magnitude)", "art-random (random)"]
    acc = [r for r in records if r["measure"] == "accuracy" and r["name"] == "art-random"]
    lo, hi = wilson_interval(acc[-1]["accuracy"], 24)
    (segments,) = bars[1][2]  # the vertical bar of every point
    assert segments.get_segments()[-1][:, 1].tolist() == pytest.approx([lo, hi])
    assert "Wilson" in ax.get_title() and "24 items" in ax.get_title()
    assert _outside_every_panel(fig)


def test_wilson_interval():
    from gisp_deploy.benchmark.report import wilson_interval

    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # the textbook 50 of 100
    lo, hi = wilson_interval(0.0, 24)
    assert lo == pytest.approx(0) and 0.1 < hi < 0.15  # inside [0, 1], where p ± 1.96·sqrt(p(1-p)/n) is (0, 0)


@pytest.mark.parametrize("values", [(72.3, 74.1), (68.0, 71.0, 105.0), (5.2, 48.0), (40.0, 91000.0), (1.3, 1.31)])
def test_log_axis_reads_plain_numbers(values):
    from matplotlib.figure import Figure

    from gisp_deploy.benchmark.report import plain_log_axis

    ax = Figure().subplots()
    ax.plot(range(len(values)), values)
    plain_log_axis(ax, values)
    ax.figure.draw_without_rendering()
    labels = _tick_labels(ax)
    assert len(labels) >= 2, labels
    for text in labels:  # "70", "1,000", "1.3": never 7×10^1 (mathtext "$\\mathdefault{7\\times10^{1}}$")
        assert "10^" not in text and "times" not in text and "$" not in text and "e+" not in text
        float(text.replace(",", ""))
    lo, hi = ax.get_ylim()
    assert lo <= min(values) and max(values) <= hi


def test_perplexity_plot_panels_and_legend(records):
    from gisp_deploy.benchmark.report import figures

    figs = figures(records)
    assert sorted(figs) == ["accuracy.png", "perplexity.png"]  # no speed records, no speed-up plot
    fig = figs["perplexity.png"]
    assert [ax.get_title() for ax in fig.axes] == ["persuasion.txt.gz, 32-token windows",
                                                   "persuasion.txt.gz, 64-token windows"]
    assert _outside_every_panel(fig)  # drawn: the tick labels are final
    for ax in fig.axes:
        assert ax.get_yscale() == "log" and len(ax.get_lines()) == 2
        labels = _tick_labels(ax)
        assert labels and all("10^" not in t and "$" not in t for t in labels), labels


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
    assert [(r["measure"], r["sparsity"]) for r in data["results"]] == \
        [("size", 0.0), ("perplexity", 0.0), ("size", 0.3), ("perplexity", 0.3)]
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
    assert result.exit_code == 2 and "pip install -e '.[vllm]'" in result.output
    assert not (tmp_path / "o").exists()


class NoisyEngine:
    """Stands in for a vLLM engine process: runs whose times follow a noisy fake timer (seeded), or steady ones."""

    def __init__(self, artifact, sparsity, cfg, noise=0.0, seed=0):
        self.base = 0.02 if sparsity is None else 0.02 / 1.2  # 1.2x: within the 0.5 slice's ideal 1.25x
        self.noise, self.gen, self.startup_s = noise, torch.Generator().manual_seed(seed), 0.0

    def run(self, batch_size):
        t = self.base * float(1 + self.noise * torch.rand((), generator=self.gen) * 8)  # up to 9x slower
        return {"ttft_s": 5 * t, "tpot_s": t, "total_s": 5 * t + 31 * t, "threads": 2}

    def close(self):
        pass


def _bench_with(monkeypatch, engine, arts, out, *extra):
    from typer.testing import CliRunner

    from gisp_deploy import cli
    from gisp_deploy.benchmark import bench as bench_module
    from gisp_deploy.serving import process

    monkeypatch.setattr(process, "require_vllm", lambda: None)
    monkeypatch.setattr(bench_module, "Engine", engine)
    return CliRunner().invoke(cli.app, ["bench", str(arts[0]), "--sparsities", "0.5", "--speed", "--batch-sizes",
                                        "1", "--gen-len", "32", "--out", str(out), "--no-plots", *extra])


def test_noisy_timings_make_bench_warn_everywhere(arts, tmp_path, monkeypatch):
    noisy = lambda art, s, cfg: NoisyEngine(art, s, cfg, noise=1.0, seed=1 if s is None else 2)  # noqa: E731
    result = _bench_with(monkeypatch, noisy, arts, tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "repeats disagree" in result.output
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["warnings"] and all("repeats disagree" in w or "beats its ideal" in w for w in data["warnings"])
    (row,) = [r for r in data["results"] if r["measure"] == "speed" and r["sparsity"] == 0.5]
    assert row["warnings"] and row["speedup_min"] <= row["speedup"] <= row["speedup_max"]
    assert len(row["tpot_runs_s"]) == row["repeats"] == 3
    md = (tmp_path / "o" / "report.md").read_text()
    assert "## Warnings" in md and "repeats disagree" in md and "⚠" in md


def test_steady_timings_give_no_warning_and_a_speed_up_within_its_bound(arts, tmp_path, monkeypatch):
    result = _bench_with(monkeypatch, NoisyEngine, arts, tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    (row,) = [r for r in data["results"] if r["measure"] == "speed" and r["sparsity"] == 0.5]
    assert data["warnings"] == [] and "## Warnings" not in (tmp_path / "o" / "report.md").read_text()
    assert row["speedup"] == pytest.approx(1.2) and row["speedup_min"] == row["speedup_max"] == row["speedup"]
    assert 1.2 < row["ideal_speedup"] < 1.3


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]')")
def test_speed_on_vllm(arts):
    from transformers import AutoModelForCausalLM

    from gisp_deploy.slicing.loader import load

    speed = SpeedConfig(batch_sizes=(1, 2), prompt_len=16, gen_len=4, repeats=2, dtype="float32",
                        enforce_eager=True)
    cfg = BenchConfig(sparsities=(0.5,), serve_dtype="float32", speed=speed)
    records = Bench(cfg, log=lambda m: None).run([arts[1]])
    rows = [r for r in records if r["measure"] == "speed"]
    assert [(r["sparsity"], r["batch_size"]) for r in rows] == [(0.0, 1), (0.0, 2), (0.5, 1), (0.5, 2)]
    for r in rows:
        assert r["ttft_s"] > 0 and r["tpot_s"] > 0 and math.isfinite(r["output_tokens_per_s"]) and r["speedup"] > 0
        assert r["prompt_len"] == 16 and r["gen_len"] == 4 and len(r["runs_s"]) == len(r["tpot_runs_s"]) == 2
        assert all(t > 0 for t in r["tpot_runs_s"]) and r["tpot_s_min"] <= r["tpot_s"] <= r["tpot_s_max"]
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"] and isinstance(r["warnings"], list)
    for r in rows[2:]:  # each slice round timed the dense engine too, in the same window
        assert r["dense_tpot_s_min"] <= r["dense_tpot_s"] <= r["dense_tpot_s_max"]

    def bytes_read(model, batch):  # float32 weights but the embedding table, and the batch's KV at context 18
        weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
        layers = getattr(model.config, "gisp_layers", None) or \
            [{"kv_heads": model.config.num_key_value_heads, "q_heads": 1}] * model.config.num_hidden_layers
        kv = sum(2 * sp["kv_heads"] * model.config.head_dim for sp in layers if sp["q_heads"]) * 4
        return 4 * weights + batch * 18 * kv

    dense, half = AutoModelForCausalLM.from_pretrained(arts[1], dtype=torch.float32), load(arts[1], 0.5)
    for r in rows[2:]:
        want = bytes_read(dense, r["batch_size"]) / bytes_read(half, r["batch_size"])
        assert r["ideal_speedup"] == pytest.approx(want, rel=1e-9) and want > 1.2
