import json
import os
import re
import subprocess
import sys

import pytest

from gisp_deploy.artifact import MANIFEST, RANKING, load_artifact
from tests.factory import CALIB_TEXT, EXAMPLE_HELDOUT, make_model_dir


def cli(*args):
    return subprocess.run([sys.executable, "-m", "gisp_deploy.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


FAST = ["--samples", "4", "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--max-sparsity", "0.5"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_model_dir(root, "qwen2-gqa")
    res = cli("prune", model, "--calib", CALIB_TEXT, "--out", root / "art", *FAST)
    assert res.returncode == 0, res.stderr
    assert "covers sparsity up to" in res.stderr and "tokens/s" in res.stderr
    return root / "art"


def test_artifact_layout_and_manifest(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", MANIFEST, RANKING} <= names
    m = json.loads((artifact / MANIFEST).read_text())
    assert m["format_version"] == 2 and m["method"] == "gisp" and m["unit"] == "q_head"
    assert set(m["files"]) == names - {MANIFEST}  # the manifest covers every other file of the artifact
    mode = (artifact / RANKING).stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # like every other file written, not 0600
    assert m["calibration"]["samples"] == 4 and len(m["calibration"]["sha256"]) == 64
    assert set(m["versions"]) >= {"gisp_deploy", "torch", "transformers"}
    assert m["coverage"] >= 0.5 and m["weights"]["sha256"]["model.safetensors"]
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".art")]  # no temporary left behind
    load_artifact(artifact).verify_weights()


def test_inspect_json_and_plot(artifact, tmp_path):
    res = cli("inspect", artifact, "--sparsities", "0.2,0.4", "--json", "--plot", tmp_path / "w.png")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["method"] == "gisp" and info["unit"] == "q_head" and info["coverage"] >= 0.5
    assert [s["sparsity"] for s in info["slices"]] == [0.2, 0.4]
    for sl in info["slices"]:
        assert sl["achieved_sparsity"] >= sl["sparsity"]
        assert [l["layer"] for l in sl["layers"]] == [0, 1, 2, 3]
        for l in sl["layers"]:
            assert l["q_heads"] == sorted(l["q_heads"]) and l["kv_heads"] == sorted({h // 2 for h in l["q_heads"]})
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"
    from gisp_deploy.slicing.loader import load

    for sl in info["slices"]:  # sizes: what the compact model really has
        model = load(artifact, sl["sparsity"])
        assert sl["parameters"] == sum(p.numel() for p in model.parameters())
        assert sl["decoder_params"] < sl["dense_decoder_params"] and sl["weight_dtype"] in ("float32", "bfloat16")
        assert sl["weight_bytes"] == sl["parameters"] * (4 if sl["weight_dtype"] == "float32" else 2)
    table = cli("inspect", artifact, "--sparsities", "0.3")
    assert table.returncode == 0 and "kept per layer" in table.stdout


def test_inspect_tables_fit_80_columns_without_wrapping_cells(artifact):
    import re

    p = subprocess.run([sys.executable, "-m", "gisp_deploy.cli", "inspect", artifact, "--sparsities",
                        "0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    assert max(len(line) for line in p.stdout.splitlines()) <= 80
    assert len(re.findall(r"\b\d+/\d+/\d+\b", p.stdout)) == 8 * 4  # every (slice, layer) cell whole
    assert len(re.findall(r"\b0\.\d+ \(0\.\d{4}\)", p.stdout)) == 8  # every header whole


def test_eval_json_records(artifact):
    res = cli("eval", artifact, "--sparsities", "0,0.4", "--text", EXAMPLE_HELDOUT, "--seq-lens", "32,64",
              "--max-tokens", "2048", "--json")
    assert res.returncode == 0, res.stderr
    recs = json.loads(res.stdout)["results"]
    assert len(recs) == 4
    for r in recs:
        assert set(r) >= {"sparsity", "achieved_sparsity", "text", "seq_len", "perplexity"}
        assert r["text"] == "persuasion.txt.gz" and r["perplexity"] > 1
    dense = [r["perplexity"] for r in recs if r["sparsity"] == 0]
    pruned = [r["perplexity"] for r in recs if r["sparsity"] == 0.4]
    assert dense != pruned
    assert {r["path"] for r in recs} == {"compact"}
    oracle = cli("eval", artifact, "--sparsities", "0,0.4", "--text", EXAMPLE_HELDOUT, "--seq-lens", "32,64",
                 "--max-tokens", "2048", "--json", "--path", "oracle")
    assert oracle.returncode == 0, oracle.stderr
    for a, b in zip(recs, json.loads(oracle.stdout)["results"]):
        assert b["path"] == "oracle" and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)


def test_eval_progress_has_totals_and_whole_names(artifact, tmp_path):
    from gisp_deploy.hf import load_tokenizer
    from gisp_deploy.quality.tasks import build_continuation_task, write_jsonl

    task = tmp_path / "heldout-continuation-task.margin.jsonl"
    write_jsonl(build_continuation_task(load_tokenizer(artifact), [str(EXAMPLE_HELDOUT)], 8, seed=1), task)
    res = cli("eval", artifact, "--sparsity", "0,0.4", "--text", EXAMPLE_HELDOUT, "--task", task, "--seq-len", "32",
              "--max-tokens", "1000", "--batch-size", "4")
    assert res.returncode == 0, res.stderr
    assert "/?" not in res.stderr  # every bar knows its total
    for s in ("0", "0.4"):
        assert f"s={s} persuasion.txt.gz" in res.stderr and f"s={s} {task.name}" in res.stderr
    counts = re.findall(r"(\d+)/(\d+) +(\w+)", res.stderr)  # done/total unit, as the bars end
    assert sorted(set(counts)) == [("8", "8", "items"), ("992", "992", "tokens")]  # 31 windows of 32; items
    assert task.name in res.stdout  # the table shows it whole


@pytest.mark.parametrize("bad,message", [("-0.1", "out of range"), ("nan", "out of range"), ("1.5", "out of range"),
                                         ("0.9", "beyond what this artifact covers")])
def test_bad_sparsity(artifact, bad, message):
    res = cli("inspect", artifact, "--sparsities", bad)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_unknown_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    res = cli("prune", tmp_path / "gpt2", "--calib", CALIB_TEXT, "--out", tmp_path / "o", *FAST)
    assert res.returncode == 2 and "GPT2LMHeadModel" in res.stderr and "LlamaForCausalLM" in res.stderr
    assert not (tmp_path / "o").exists()


def test_bad_prune_inputs(tmp_path):
    model = make_model_dir(tmp_path, "llama-gqa")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["--calib", empty], "shorter than one sample"),
        ([], "no calibration data"),
        (["--calib", CALIB_TEXT, "--max-sparsity", "1.2"], "--max-sparsity"),
        (["--calib", CALIB_TEXT, "--method", "sparsegpt"], "unknown method"),
        (["--calib", CALIB_TEXT, "--protect-first", "0.5", "--protect-last", "2"], "lower --max-sparsity"),
    ]
    for extra, message in cases:
        res = cli("prune", model, "--out", tmp_path / "o", *FAST, *extra)
        assert res.returncode == 2 and message in res.stderr, (extra, res.stderr)
        assert not (tmp_path / "o").exists()
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    res = cli("prune", model, "--calib", CALIB_TEXT, "--out", tmp_path / "o", *FAST)
    assert res.returncode == 2 and "never loads pickles" in res.stderr


def test_existing_output_is_not_clobbered(artifact):
    before = (artifact / RANKING).read_bytes()
    res = cli("prune", artifact, "--calib", CALIB_TEXT, "--out", artifact, *FAST)
    assert res.returncode == 2 and "already exists" in res.stderr
    assert (artifact / RANKING).read_bytes() == before


def test_tampered_and_future_artifacts(artifact, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    ranking = bad / RANKING
    ranking.chmod(0o644)
    ranking.write_bytes(ranking.read_bytes()[:-10])
    res = cli("inspect", bad)
    assert res.returncode == 2 and "ranking.safetensors" in res.stderr and "sha256" in res.stderr
    future = tmp_path / "future"
    shutil.copytree(artifact, future)
    m = json.loads((future / MANIFEST).read_text())
    m["format_version"] = 99
    (future / MANIFEST).write_text(json.dumps(m))
    res = cli("inspect", future)
    assert res.returncode == 2 and "newer than this gisp-deploy reads" in res.stderr


def test_no_copy_weights_records_a_reference(tmp_path):
    model = make_model_dir(tmp_path, "llama-mha")
    res = cli("prune", model, "--method", "magnitude", "--out", tmp_path / "ref", "--no-copy-weights", *FAST)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "ref" / "model.safetensors").exists()
    art = load_artifact(tmp_path / "ref")
    assert art.weights_dir == model.resolve()
    art.verify_weights()


def test_help_shows_examples():
    for cmd in ("prune", "inspect", "eval"):
        res = cli(cmd, "--help")
        assert res.returncode == 0 and "Examples" in res.stdout and "gisp-deploy " + cmd in res.stdout


def test_device_map_and_auto_batch_give_the_same_artifact_ranking(tmp_path):
    """--device-map goes through accelerate's placement and dispatch; on a CPU-only machine every layer lands
    on the CPU, and the ranking must be byte-identical to a plain --device cpu run with the same micro-batch."""
    model = make_model_dir(tmp_path, "llama-gqa")
    opts = ["--calib", CALIB_TEXT, "--samples", "20", "--seq-len", "32", "--steps", "2", "--max-sparsity", "0.4"]
    placed = cli("prune", model, "--out", tmp_path / "placed", *opts, "--device-map", "auto")
    assert placed.returncode == 0, placed.stderr
    assert "layers placed with accelerate (auto): all on cpu" in placed.stderr
    assert "micro-batch: 16 sequences of 32 tokens" in placed.stderr
    plain = cli("prune", model, "--out", tmp_path / "plain", *opts, "--device", "cpu", "--batch-size", "16")
    assert plain.returncode == 0, plain.stderr
    assert (tmp_path / "placed" / RANKING).read_bytes() == (tmp_path / "plain" / RANKING).read_bytes()
    run = json.loads((tmp_path / "placed" / MANIFEST).read_text())["run"]
    assert run["device"] == "auto: all on cpu" and run["batch_size"] == 16 and run["compute"] == "compact"
    for extra, message in ((["--device", "cpu", "--device-map", "auto"], "not both"),
                           (["--device-map", "everywhere"], "choose one of auto, balanced, sequential"),
                           (["--batch-size", "many"], "give a number of sequences, or auto"),
                           (["--compute", "sparse"], "unknown compute mode")):
        res = cli("prune", model, "--out", tmp_path / "bad", *opts, *extra)
        assert res.returncode == 2 and message in res.stderr, (extra, res.stderr)
        assert not (tmp_path / "bad").exists()


def test_version_and_short_help():
    from gisp_deploy import __version__

    assert cli("--version").stdout.strip() == f"gisp-deploy {__version__}"
    for args in (["-h"], ["inspect", "-h"]):
        res = cli(*args)
        assert res.returncode == 0 and "Usage:" in res.stdout and "[OPTIONS]" in res.stdout, res.stdout


def test_load_on_cuda_without_a_gpu_says_so(artifact, monkeypatch):
    import torch

    import gisp_deploy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is visible; use --device cpu"):
        gisp_deploy.load(artifact, 0.2, device="cuda")


# A mistyped option answers before torch, transformers or vLLM is imported (the time it takes is measured by
# bench/error_latency.py, not here).
BAD_ARGUMENTS = [
    (["inspect", "{missing}"], "no such artifact directory"),
    (["inspect", "{art}", "--sparsities", "1.5"], "out of range"),
    (["eval", "{art}", "--sparsities", "1.5", "--text", EXAMPLE_HELDOUT], "out of range"),
    (["eval", "{art}", "--text", "nothere.txt"], "--text nothere.txt: no such file"),
    (["eval", "{art}", "--text", EXAMPLE_HELDOUT, "--dtype", "foo"], "--dtype 'foo'"),
    (["eval", "{art}", "--text", EXAMPLE_HELDOUT, "--max-tokens", "1"], "--max-tokens 1 is shorter"),
    (["eval", "{art}", "--text", EXAMPLE_HELDOUT, "--seq-lens", "1"], "--seq-lens '1'"),
    (["eval", "{art}", "--text", EXAMPLE_HELDOUT, "--device", "gpu"], "--device 'gpu'"),
    (["check", "{art}", "--sparsities", "0.2,,0.4"], "empty item"),
    (["export", "{art}", "--sparsity", "0.4", "--dtype", "int4", "--out", "{tmp}/x"], "--dtype 'int4'"),
    (["bench", "{art}", "--batch-sizes", "0", "--speed"], "--batch-sizes '0'"),
    (["bench", "{art}", "{missing}"], "no such artifact directory"),
    (["prune", "{model}", "--calib", "calib.txt", "--out", "{tmp}/y"], "--calib calib.txt: no such file"),
    (["prune", "{model}", "--score", "third", "--out", "{tmp}/y"], "--score 'third': choose first, second, mix"),
    (["prune", "{model}", "--score", "mix", "--objective", "margin", "--out", "{tmp}/y"], "needs a loss to expand"),
    (["prune", "{model}", "--in-loop-refit", "ls", "--method", "wanda-sp", "--out", "{tmp}/y"], "takes no steps"),
    (["make-task", "{model}", "--text", "nothere.txt", "--out", "{tmp}/t"], "--text nothere.txt"),
    (["reorder", "{missing}", "--out", "{tmp}/r"], "no such artifact directory"),
    (["inspect", "{model}"], "a model directory, not a gisp-deploy artifact"),
    (["eval", "{art}", "--text", EXAMPLE_HELDOUT, "--refit", "lsq"], "--refit 'lsq': choose none, ls, ec"),
    (["export", "{art}", "--sparsity", "0.4", "--refit", "x", "--out", "{tmp}/x"], "--refit 'x'"),
    (["check", "{art}", "--refit", "x"], "--refit 'x'"),
    (["bench", "{art}", "--refit", "x"], "--refit 'x'"),
    (["serve", "{art}", "--sparsity", "0.4", "--refit", "x"], "--refit 'x'"),
    (["serve", "{art}", "--refit", "ls"], "--refit corrects one slice of an artifact: pass --sparsity"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=[" ".join(map(str, a[:3])) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_fail_before_heavy_imports(artifact, tmp_path, argv, message):
    model = artifact.parent / "qwen2-gqa"
    argv = [str(a).format(art=artifact, missing=artifact.parent / "nope", model=model, tmp=tmp_path) for a in argv]
    probe = ("import sys\nfrom gisp_deploy.cli import app\nsys.argv = ['gisp-deploy', *sys.argv[1:]]\n"
             "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'vllm', 'numpy') if m in sys.modules)\n"
             "print('exit', code, 'heavy', heavy)\n")
    p = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    assert "exit 2 heavy []" in p.stdout, (p.stdout, p.stderr)
    assert message in p.stderr and p.stderr.count("error:") == 1 and "Traceback" not in p.stderr


def test_former_option_names_still_work(artifact):
    res = cli("eval", artifact, "--sparsity", "0.2", "--seq-len", "16", "--text", EXAMPLE_HELDOUT, "--max-tokens",
              "256", "--json")
    assert res.returncode == 0, res.stderr
    (rec,) = json.loads(res.stdout)["results"]
    assert rec["sparsity"] == 0.2 and rec["seq_len"] == 16
    assert "--sparsity " not in cli("eval", "--help").stdout.replace("--sparsity-", "")  # hidden alias


def _examples():
    from gisp_deploy.cli import bench, prune, quality, serve, slices

    return {"prune": prune.PRUNE_EXAMPLES, "reorder": prune.REORDER_EXAMPLES, "inspect": slices.INSPECT_EXAMPLES, "export": slices.EXPORT_EXAMPLES,
            "fit": slices.FIT_EXAMPLES,
            "eval": quality.EVAL_EXAMPLES, "check": quality.CHECK_EXAMPLES, "make-task": quality.MAKE_TASK_EXAMPLES,
            "serve": serve.SERVE_EXAMPLES, "bench": bench.BENCH_EXAMPLES}


@pytest.mark.parametrize("command", sorted(_examples()))
def test_help_examples_survive_an_80_column_terminal(command):
    p = subprocess.run([sys.executable, "-m", "gisp_deploy.cli", command, "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "80", "TERM": "dumb"}, timeout=60)
    assert p.returncode == 0, p.stderr
    shown = {line.strip() for line in p.stdout.splitlines()}
    for line in _examples()[command].replace("[bold]", "").replace("[/]", "").splitlines():
        assert line.strip() in shown, f"{line!r} is wrapped or missing in `{command} --help` at 80 columns"
    usage = next(line for line in p.stdout.splitlines() if "Usage:" in line)
    assert "{" not in usage and "<bool>" not in p.stdout


def test_an_out_whose_folders_cannot_be_created_names_them(artifact):
    res = cli("export", artifact, "--sparsity", "0.4", "--out", "/proc/nope/x")
    assert res.returncode == 2 and "/proc/nope does not exist and cannot be created in /proc" in res.stderr
