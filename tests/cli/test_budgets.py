"""A budget wherever a sparsity is taken: inspect, eval, bench and check pick the slice `fit` picks (eval and bench
next to the dense model); a budget and sparsities together, or a bad budget, is one line before anything is read."""

import json

import pytest

from gisp_deploy.budget import fit
from tests.factory import EXAMPLE_HELDOUT, run_cli as cli, speed_results

BUDGET = ["--fit-params", "540K", "--max-model-len", "64"]
TEXT = ["--text", EXAMPLE_HELDOUT, "--seq-lens", "32", "--max-tokens", "256"]


@pytest.fixture(scope="module")
def artifact(q_head_artifact):
    return q_head_artifact


@pytest.fixture(scope="module")
def chosen(artifact) -> float:
    s = fit(artifact, params="540K", max_model_len=64).cost.sparsity
    assert 0 < s < artifact.ranking.coverage
    return s


def test_inspect_describes_the_slice_fit_chooses(artifact, chosen, tmp_path):
    res = cli("inspect", artifact.path, *BUDGET, "--json")
    assert res.returncode == 0, res.stderr
    assert [sl["sparsity"] for sl in json.loads(res.stdout)["slices"]] == [chosen]
    assert f"budget: sparsity {chosen:g} of {artifact.path}" in res.stderr
    table = speed_results(tmp_path / "results.json", artifact, {0.2: 1.25, 0.4: 1.6})
    want = fit(artifact, speedup=1.4, speed_table=table, max_model_len=64).cost.sparsity
    res = cli("inspect", artifact.path, "--fit-speedup", "1.4", "--speed-table", table, "--max-model-len", "64",
              "--json")
    assert res.returncode == 0, res.stderr
    assert [sl["sparsity"] for sl in json.loads(res.stdout)["slices"]] == [want]


def test_eval_measures_the_budgets_slice_next_to_the_dense_model(artifact, chosen):
    res = cli("eval", artifact.path, *BUDGET, *TEXT, "--json")
    assert res.returncode == 0, res.stderr
    records = json.loads(res.stdout)["results"]
    assert sorted({r["sparsity"] for r in records}) == [0.0, chosen] and all(r["perplexity"] > 1 for r in records)


def test_bench_measures_the_budgets_slice_and_records_the_budget(artifact, chosen, tmp_path):
    res = cli("bench", artifact.path, *BUDGET, *TEXT, "--out", tmp_path / "b", "--no-plots")
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    assert sorted({r["sparsity"] for r in doc["results"]}) == [0.0, chosen]
    assert doc["artifact_digests"] == {str(artifact.path): artifact.digest}
    assert doc["budget"] == {"fit_params": 540_000, "max_model_len": 64, "max_num_seqs": 1, "batch_size": 1,
                             "kv_cache_dtype": "auto", "reserve": "5%+512MiB", "speed_table": None}


def test_check_checks_the_budgets_slice(artifact, chosen, tmp_path):
    res = cli("check", artifact.path, *BUDGET, "--json", tmp_path / "c.json")
    assert res.returncode == 0, res.stderr + res.stdout
    names = [r["name"] for r in json.loads((tmp_path / "c.json").read_text())["results"]]
    assert f"s={chosen:g}: slice plan" in names and not any(n.startswith("s=0.2:") for n in names)


@pytest.mark.parametrize("command", ["inspect", "eval", "bench", "check"])
@pytest.mark.parametrize("args,said", [
    (["--sparsities", "0.4", "--fit-memory", "1GiB"], "a sparsity and a budget together: drop --sparsity"),
    (["--fit-speedup", "fast"], "--fit-speedup 'fast': give a speed-up"),
    (["--fit-memory", "24 gigs"], "--fit-memory '24 gigs': unknown unit 'gigs'"),
])
def test_a_bad_budget_is_one_line_before_the_artifact_is_read(tmp_path, command, args, said):
    text = ["--text", EXAMPLE_HELDOUT] if command == "eval" else []
    res = cli(command, tmp_path / "no-such-artifact", *args, *text)
    assert res.returncode == 2 and said in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
