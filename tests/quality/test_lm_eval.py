"""lm-eval tasks on slices: lm-eval's HF wrapper on the compact model, a local task YAML over JSONL, its records
against a hand computation on the oracle, and clear errors before any model is loaded."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("lm_eval")

from gisp_deploy.artifact import load_artifact, write_artifact  # noqa: E402
from gisp_deploy.families import ModelShape  # noqa: E402
from gisp_deploy.hf import load_tokenizer  # noqa: E402
from gisp_deploy.plan import plan_slice  # noqa: E402
from gisp_deploy.pruning.methods import PruneConfig, prune  # noqa: E402
from gisp_deploy.quality import evaluate  # noqa: E402
from gisp_deploy.quality.lm_eval import prepare_tasks, run_lm_eval  # noqa: E402
from gisp_deploy.slicing.loader import load  # noqa: E402
from tests.factory import ROOT, dense_model, make_model_dir  # noqa: E402

EXAMPLE_YAML = ROOT / "examples" / "lm-eval" / "persuasion_continuation.yaml"
LIMIT = 12


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    model_dir = make_model_dir(root, "qwen2-gqa")  # seed 0: neither acc nor acc_norm 0 or 1 on 12 items
    dense = dense_model(model_dir)
    ranking = prune(dense, ModelShape.from_config(dense.config), None,
                    PruneConfig(method="magnitude", max_sparsity=0.6, protect_first=0))
    return load_artifact(write_artifact(root / "art", model_dir, ranking, {"method": "magnitude"}))


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    """The example task with its data file made absolute: lm-eval reads data_files relative to the working
    directory."""
    cfg = yaml.safe_load(EXAMPLE_YAML.read_text())
    cfg["dataset_kwargs"]["data_files"]["test"] = str(ROOT / cfg["dataset_kwargs"]["data_files"]["test"])
    path = tmp_path_factory.mktemp("task") / "persuasion_continuation.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(n=LIMIT):
    data = ROOT / yaml.safe_load(EXAMPLE_YAML.read_text())["dataset_kwargs"]["data_files"]["test"]
    return [json.loads(line) for line in data.read_text().splitlines()[:n]]


def _by_metric(records):
    return {r["metric"]: r for r in records}


@pytest.fixture(scope="module")
def slice_records(artifact, task_yaml):
    return run_lm_eval(load(artifact, 0.4), load_tokenizer(artifact.path), [str(task_yaml)], batch_size=5,
                       limit=LIMIT)


def test_records_of_a_local_task(slice_records):
    got = _by_metric(slice_records)
    assert set(got) == {"acc", "acc_norm"}
    for r in got.values():
        assert r["measure"] == "lm_eval" and r["task"] == "persuasion_continuation" and r["filter"] == "none"
        assert 0 <= r["value"] <= 1 and r["stderr"] > 0
        assert r["items"] == LIMIT and r["num_fewshot"] == 0 and r["lm_eval_version"].startswith("0.4.")


def test_accuracy_equals_a_hand_computation_on_the_oracle(artifact, slice_records):
    """lm-eval's numbers for the compact slice are the ones its documented rule gives on the oracle (the dense
    model with the removed structures zeroed), scored one unpadded sequence at a time: context and option
    encoded whole and split at the context's tokens; acc = the highest total log-likelihood, acc_norm = the
    highest per character; standard error = sample standard deviation / sqrt(n)."""
    from gisp_deploy.slicing.oracle import apply_oracle

    tok = load_tokenizer(artifact.path)
    oracle = dense_model(artifact.weights_dir)
    apply_oracle(oracle, plan_slice(artifact.ranking, 0.4))
    correct = {"acc": [], "acc_norm": []}
    for row in _rows():
        context = row["prompt"].rstrip()
        lls = []
        for choice in row["choices"]:
            continuation = row["prompt"][len(context):] + choice
            ctx = tok.encode(context)
            ids = tok.encode(context + continuation)
            with torch.no_grad():
                logp = F.log_softmax(oracle(torch.tensor([ids])).logits[0].double(), -1)
            lls.append(sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids))))
        chars = [len(c) for c in row["choices"]]
        correct["acc"].append(max(range(len(lls)), key=lls.__getitem__) == row["answer"])
        correct["acc_norm"].append(max(range(len(lls)), key=lambda k: lls[k] / chars[k]) == row["answer"])
    got = _by_metric(slice_records)
    for metric, hits in correct.items():
        p = sum(hits) / len(hits)
        assert got[metric]["value"] == pytest.approx(p, abs=1e-12), metric
        assert got[metric]["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(hits) - 1)), rel=1e-9), metric


def test_records_from_results_of_groups_and_filters():
    from gisp_deploy.quality.lm_eval import lm_eval_records

    results = {"results": {"t1": {"alias": "t1", "sample_len": 4, "acc,none": 0.25, "acc_stderr,none": 0.1,
                                  "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": "N/A"},
                           "t2": {"acc,none": 1.0, "acc_stderr,none": 0.0}},
               "groups": {"g": {"alias": "g", "acc,none": 0.7, "acc_stderr,none": 0.05}},
               "group_subtasks": {"g": ["t1", "t2"]}, "n-shot": {"t1": 0, "t2": 5},
               "n-samples": {"t1": {"original": 10, "effective": 4}, "t2": {"original": 6, "effective": 6}},
               "lm_eval_version": "0.4.13"}
    got = [(r["task"], r["metric"], r["filter"], r["value"], r["stderr"], r["items"], r["num_fewshot"])
           for r in lm_eval_records(results)]
    assert got == [("t1", "acc", "none", 0.25, 0.1, 4, 0), ("t1", "exact_match", "strict-match", 0.5, None, 4, 0),
                   ("t2", "acc", "none", 1.0, 0.0, 6, 5), ("g", "acc", "none", 0.7, 0.05, 10, None)]


def test_unknown_task_is_one_error_before_any_model_loads(artifact, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the task list was checked")

    monkeypatch.setattr(evaluate, "load", no_loading)
    tok = load_tokenizer(artifact.path)
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'hellaswg'; did you mean hellaswag"):
        evaluate.evaluate_slices(artifact, tok, [0.4], lm_eval_tasks=["hellaswg"])
    with pytest.raises(ValueError, match=r"nope\.yaml: no such lm-eval task YAML file"):
        evaluate.evaluate_slices(artifact, tok, [0.4], lm_eval_tasks="nope.yaml")
    with pytest.raises(ValueError, match="lm-eval limit 0"):
        evaluate.evaluate_slices(artifact, tok, [0.4], lm_eval_tasks="nope.yaml", lm_eval_limit=0)


def test_a_missing_data_file_names_the_rule(tmp_path, monkeypatch):
    cfg = yaml.safe_load(EXAMPLE_YAML.read_text())  # its data file is relative: from tmp_path it is not there
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="data file examples/lm-eval/persuasion-continuation.jsonl not found "
                                         r"\(lm-eval reads data_files relative to the working directory"):
        prepare_tasks([str(path)])


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gisp_deploy.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_eval_command_runs_a_task_yaml(artifact, task_yaml, slice_records):
    res = _cli("eval", artifact.path, "--sparsity", "0,0.4", "--lm-eval-tasks", task_yaml, "--lm-eval-limit", LIMIT,
               "--batch-size", "7", "--json")
    assert res.returncode == 0, res.stderr
    recs = [r for r in json.loads(res.stdout)["results"] if r["measure"] == "lm_eval"]
    assert sorted((r["sparsity"], r["metric"]) for r in recs) == [(0, "acc"), (0, "acc_norm"), (0.4, "acc"),
                                                                    (0.4, "acc_norm")]
    at = {r["metric"]: r for r in recs if r["sparsity"] == 0.4}
    for metric, r in _by_metric(slice_records).items():  # the same numbers as the library call, another batch size
        assert at[metric]["value"] == r["value"] and at[metric]["items"] == LIMIT
        assert at[metric]["achieved_sparsity"] >= 0.4 and at[metric]["path"] == "compact"
    table = _cli("eval", artifact.path, "--sparsity", "0.4", "--lm-eval-tasks", task_yaml, "--lm-eval-limit", "4",
                 env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "persuasion_continuation acc (lm-eval)" in table.stdout and "± " in table.stdout


@pytest.mark.slow
def test_eval_command_errors_are_one_line(artifact, tmp_path):
    res = _cli("eval", artifact.path, "--sparsity", "0.4", "--lm-eval-tasks", "hellaswg")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: unknown lm-eval task 'hellaswg'; did you mean hellaswag" in res.stderr
    # a Hub task without network (forced here, and an empty cache): which task, why, and the local way out
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
               "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    res = _cli("eval", artifact.path, "--sparsity", "0.4", "--lm-eval-tasks", "arc_easy", env=offline)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = next(x for x in res.stderr.splitlines() if x.startswith("error:"))
    assert line.startswith("error: lm-eval task 'arc_easy' reads allenai/ai2_arc from the Hugging Face Hub, which "
                           "could not be reached")
    assert "needs network access or the dataset in the Hugging Face cache" in line and "local task YAML" in line


def test_bench_reports_lm_eval(artifact, task_yaml, tmp_path):
    from gisp_deploy.benchmark.bench import bench

    records, written = bench([artifact.path], sparsities="0.4", lm_eval_tasks=str(task_yaml), lm_eval_limit=6,
                             out=tmp_path / "b", plots=False, log=lambda m: None)
    saved = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    lm = [r for r in saved if r["measure"] == "lm_eval"]
    assert sorted((r["sparsity"], r["metric"]) for r in lm) == [(0, "acc"), (0, "acc_norm"), (0.4, "acc"),
                                                                  (0.4, "acc_norm")]
    assert all(r["items"] == 6 for r in lm)
    report = (tmp_path / "b" / "report.md").read_text()
    assert "## lm-eval persuasion_continuation, acc ± standard error, 6 items, 0-shot" in report
    at = next(r for r in lm if r["sparsity"] == 0.4 and r["metric"] == "acc")
    assert f"{at['value']:.3f} ± {at['stderr']:.3f}" in report


def test_check_gates_on_lm_eval_acc(artifact, task_yaml, slice_records):
    from gisp_deploy.quality.check import check

    acc = _by_metric(slice_records)["acc"]["value"]
    passed = check(artifact.path, [0.4], lm_eval_tasks=[str(task_yaml)], lm_eval_limit=LIMIT, min_lm_eval_acc=acc)
    gate = next(r for r in passed.results if r.name == f"s=0.4: lm-eval persuasion_continuation acc >= {acc:g}")
    assert passed.ok and gate.message.startswith(f"{acc:.3f} ± ")
    failed = check(artifact.path, [0.4], lm_eval_tasks=[str(task_yaml)], lm_eval_limit=LIMIT,
                   min_lm_eval_acc=acc + 0.01)
    assert [r.name for r in failed.results if not r.ok] == [f"s=0.4: lm-eval persuasion_continuation acc >= "
                                                            f"{acc + 0.01:g}"]
    with pytest.raises(ValueError, match="--min-lm-eval-acc needs --lm-eval-tasks"):
        check(artifact.path, [0.4], min_lm_eval_acc=0.5)


def test_without_lm_eval_installed_the_error_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # what `import` sees where lm-eval is not installed
    with pytest.raises(ValueError, match=r"^lm-eval tasks need lm-eval: pip install 'lm-eval>=0.4.13'$"):
        prepare_tasks(["arc_easy"])
