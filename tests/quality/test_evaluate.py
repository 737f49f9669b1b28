"""Progress of evaluate_slices: one pass per slice and text (tokens) and per slice and task (items), each with
its total known before it starts and moving while it runs; the accuracy record's choices and chance."""

import pytest
import torch

from gisp_deploy.artifact import load_artifact, write_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.hf import load_tokenizer
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.quality.evaluate import evaluate_slices
from gisp_deploy.quality.tasks import build_continuation_task, task_accuracy, write_jsonl
from tests.factory import EXAMPLE_HELDOUT, make_model_dir


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("evaluate")
    model_dir = make_model_dir(root, "qwen2-gqa")
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ranking = prune(dense, ModelShape.from_config(dense.config), None,
                    PruneConfig(method="magnitude", max_sparsity=0.6, protect_first=0))
    return load_artifact(write_artifact(root / "art", model_dir, ranking, {"method": "magnitude"}))


class Recorder:
    """A progress callback that keeps every pass: [description, total, unit, [advances]]."""

    def __init__(self):
        self.passes = []

    def __call__(self, description, total, unit):
        self.passes.append([description, total, unit, []])
        return self.passes[-1][3].append


def test_every_pass_has_its_total_in_advance(artifact, tmp_path):
    tok = load_tokenizer(artifact.path)
    task = tmp_path / "heldout-task.margin.jsonl"
    write_jsonl(build_continuation_task(tok, [str(EXAMPLE_HELDOUT)], 10, choices=4, seed=2), task)
    rec = Recorder()
    records = evaluate_slices(artifact, tok, [0, 0.4], [str(EXAMPLE_HELDOUT)], [32, 64], max_tokens=500,
                              batch_size=3, progress=rec, tasks=[str(task)])
    assert [(d, t, u) for d, t, u, _ in rec.passes] == [
        # 500 tokens: 15 windows of 32 and 7 of 64 are read
        ("s=0 persuasion.txt.gz", 15 * 32 + 7 * 64, "tokens"), ("s=0 heldout-task.margin.jsonl", 10, "items"),
        ("s=0.4 persuasion.txt.gz", 15 * 32 + 7 * 64, "tokens"), ("s=0.4 heldout-task.margin.jsonl", 10, "items")]
    for description, total, unit, advances in rec.passes:
        assert sum(advances) == total, description
        assert len([n for n in advances if n > 0]) > 1, description  # it moves while the pass runs
    # 40 options in batches of 3: an item counts once its 4th option is scored
    assert rec.passes[1][3][:5] == [0, 1, 1, 1, 0]  # options scored: 3, 6, 9, 12, 15; items done: 0, 1, 2, 3, 3
    accuracy = [r for r in records if r["measure"] == "accuracy"]
    assert [(r["items"], r["choices"], r["chance"]) for r in accuracy] == [(10, 4, 0.25)] * 2


def test_choices_and_chance_of_uneven_items(artifact, tmp_path):
    from gisp_deploy.slicing.loader import load

    tok = load_tokenizer(artifact.path)
    rows = build_continuation_task(tok, [str(EXAMPLE_HELDOUT)], 4, choices=4, seed=0)
    rows[1]["choices"], rows[1]["answer"] = rows[1]["choices"][:2], 0  # one item of 2 options among 3 of 4
    write_jsonl(rows, tmp_path / "t.jsonl")
    rec = Recorder()
    got = task_accuracy(load(artifact, 0), tok, tmp_path / "t.jsonl", batch_size=5, progress=rec)
    assert got["choices"] == pytest.approx(14 / 4) and got["chance"] == pytest.approx((3 / 4 + 1 / 2) / 4)
    assert rec.passes[0][:3] == ["t.jsonl", 4, "items"] and sum(rec.passes[0][3]) == 4
