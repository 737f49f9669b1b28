"""`gisp-deploy fit`: the choice, its neighbours and the binding constraint in words and as JSON; bad budgets
refused in one line before the artifact is read."""

import json
import os

import pytest

from gisp_deploy.budget import fit, prefix_sparsity, slice_cost
from gisp_deploy.plan import plan_slice
from tests.factory import run_cli as cli, speed_results

OPTS = ["--max-model-len", "64", "--max-num-seqs", "2", "--dtype", "bfloat16", "--reserve", "0"]


@pytest.fixture(scope="module")
def artifact(q_head_artifact):
    return q_head_artifact


def test_fit_explains_the_choice_and_prints_the_same_as_json(artifact):
    middle = prefix_sparsity(artifact.ranking, artifact.ranking.num_covered // 2)
    budget = slice_cost(artifact.config, plan_slice(artifact.ranking, middle), dtype="bfloat16", tokens=128).memory
    want = fit(artifact, memory=budget, max_model_len=64, max_num_seqs=2, dtype="bfloat16", reserve="0")
    half = want.cost.sparsity  # the middle prefix, or a shorter one of the same size (padding heads stay)
    assert half <= middle and want.cost.memory == budget
    res = cli("fit", artifact.path, "--fit-memory", budget, *OPTS, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["sparsity"] == half and got["binding"] == "memory" and got["headroom"] == {"memory": 0}
    assert [c["role"] for c in got["candidates"]] == [c.role for c in want.candidates]
    assert got["cost"]["kv_bytes"] == want.cost.kv_bytes and got["settings"]["max_num_seqs"] == 2
    res = cli("fit", artifact.path, "--fit-memory", f"{budget}", *OPTS)
    assert res.returncode == 0, res.stderr
    assert f"chosen: sparsity {half:g}" in res.stdout and "binding: memory: the next larger slice" in res.stdout
    assert f"serve it: gisp-deploy serve {artifact.path} --sparsity {half:g}" in res.stdout
    rows = {line.split("│")[-2].strip(): line for line in res.stdout.splitlines() if line.count("│") > 4}
    assert "yes, 0 B left" in rows["chosen"] and "no," in rows["next larger"] and "over" in rows["next larger"]


def test_a_parameter_budget_binds_on_parameters(artifact):
    res = cli("fit", artifact.path, "--fit-params", "540K", *OPTS, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["cost"]["parameters"] <= 540_000 < got["candidates"][0]["parameters"]
    assert got["binding"] == "parameters" and got["headroom"]["parameters"] >= 0


@pytest.mark.parametrize("args,said", [
    (["--fit-memory", "24gigs"], "--fit-memory '24gigs': unknown unit 'gigs'; write e.g. 24GiB"),
    (["--fit-params", "lots"], "--fit-params 'lots': unknown unit 'lots'; write e.g. 5B"),
    ([], "no budget given: pass --fit-memory (e.g. 24GiB), --fit-params (e.g. 5B) and / or --fit-speedup"),
    (["--fit-speedup", "fast"], "--fit-speedup 'fast': give a speed-up over the dense model"),
    (["--fit-memory", "1GiB", "--kv-cache-dtype", "int4"], "--kv-cache-dtype 'int4': choose auto"),
    (["--fit-memory", "1GiB", "--reserve", "200%"], "--reserve '200%': a share is a percentage"),
])
def test_bad_options_answer_in_one_line_before_the_artifact_is_read(tmp_path, args, said):
    res = cli("fit", tmp_path / "no-such-artifact", *args)
    assert res.returncode == 2 and said in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_an_impossible_budget_says_what_is_missing(artifact):
    res = cli("fit", artifact.path, "--fit-memory", "10KiB", *OPTS)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "even the most pruned slice this artifact covers" in res.stderr and "more than --fit-memory" in res.stderr


def test_export_by_budget_writes_the_slice_fit_chose(artifact, tmp_path):
    budget = fit(artifact, params="540K", max_model_len=64).cost
    res = cli("export", artifact.path, "--fit-params", "540K", "--out", tmp_path / "e", "--max-model-len", "64")
    assert res.returncode == 0, res.stderr
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["gisp_slice"]["sparsity"] == budget.sparsity and "the slice the budget chose" in res.stderr


@pytest.mark.parametrize("args,said", [
    (["--sparsity", "0.4", "--fit-memory", "1GiB"], "a sparsity and a budget together: drop --sparsity"),
    ([], "pass --sparsity (e.g. 0.4) or a budget"),
    (["--fit-memory", "24 gigs"], "--fit-memory '24 gigs': unknown unit 'gigs'"),
])
def test_export_takes_a_sparsity_or_a_budget(tmp_path, args, said):
    res = cli("export", tmp_path / "no-such-artifact", "--out", tmp_path / "e", *args)
    assert res.returncode == 2 and said in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.fixture(scope="module")
def table(artifact, tmp_path_factory):
    """Speed-ups measured at 0.2 and 0.4, perplexity at 0.2."""
    path = tmp_path_factory.mktemp("table") / "results.json"
    return speed_results(path, artifact, {0.2: 1.25, 0.4: 1.6}, perplexity={0.0: 60.0, 0.2: 70.25})


def test_fit_by_measured_speedup_says_its_source_and_shows_measured_points(artifact, table):
    want = fit(artifact, speedup=1.4, speed_table=table, max_model_len=64)
    res = cli("fit", artifact.path, "--fit-speedup", "1.4x", "--speed-table", table, "--max-model-len", "64", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["sparsity"] == want.cost.sparsity and got["speed_source"] == f"measured: {table}, batch 1, 3 points"
    assert got["speedup"] >= 1.4 and got["binding"] == "speed-up"
    res = cli("fit", artifact.path, "--fit-speedup", "1.4", "--speed-table", table, "--max-model-len", "64",
              env={**os.environ, "COLUMNS": "200"})  # a wide terminal: every column
    assert res.returncode == 0, res.stderr
    assert f"(measured: {table}, batch 1, 3 points; 32-token mean context)" in res.stdout
    header = next(line for line in res.stdout.splitlines() if "sparsity" in line and "┃" in line)
    assert "measured" in header and "ppl" in header and "ideal" in header
    assert "ppl: persuasion.txt.gz at 128 tokens" in res.stdout
    rows = {line.split("│")[1].strip(): line for line in res.stdout.splitlines() if line.count("│") > 4}
    assert "70.25" in rows["0.2"] and "1.250x" in rows["0.2"] and "60.00" in rows["0"]
    assert all("—" in line for s, line in rows.items() if s not in ("0", "0.2", "0.4"))  # not measured: no ppl


def test_fit_by_ideal_speedup_and_a_narrow_terminal(artifact):
    res = cli("fit", artifact.path, "--fit-speedup", "1.1", "--max-model-len", "64", "--batch-size", "4",
              env={**os.environ, "COLUMNS": "100"})
    assert res.returncode == 0, res.stderr
    assert "(ideal (bytes read); batch 4, 64-token context)" in res.stdout
    table = [line for line in res.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and max(map(len, table)) <= 100  # optional columns gave way
    assert all(col in table[1] for col in ("sparsity", "total", "ideal", "fits")) and "achieved" not in table[1]


def test_a_speedup_beyond_the_measured_slices_and_a_bad_table_are_one_line(artifact, table, tmp_path):
    res = cli("fit", artifact.path, "--fit-speedup", "1.7", "--speed-table", table, "--max-model-len", "64")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "never extrapolated" in res.stderr and "gisp-deploy bench ARTIFACT --speed --batch-sizes 1" in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": [{"measure": "speed", "batch_size": 1, "speedup": "quick"}]}')
    res = cli("fit", tmp_path / "no-such-artifact", "--fit-speedup", "1.2", "--speed-table", bad)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"--speed-table {bad}" in res.stderr and "not a finite number" in res.stderr


def test_export_by_speedup_writes_the_slice_fit_chose(artifact, table, tmp_path):
    want = fit(artifact, speedup=1.4, speed_table=table, max_model_len=64).cost
    res = cli("export", artifact.path, "--fit-speedup", "1.4", "--speed-table", table, "--max-model-len", "64",
              "--out", tmp_path / "e")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "e" / "config.json").read_text())["gisp_slice"]["sparsity"] == want.sparsity
