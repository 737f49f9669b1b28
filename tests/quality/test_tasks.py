import json

import torch
import torch.nn.functional as F

from gisp_deploy.data import token_stream
from gisp_deploy.quality.tasks import build_continuation_task, task_accuracy, write_jsonl
from tests.factory import EXAMPLE_HELDOUT, EXAMPLE_MODEL


def test_continuation_task_and_accuracy(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(EXAMPLE_MODEL)
    rows = build_continuation_task(tok, [EXAMPLE_HELDOUT], n=12, seed=0)
    text = tok.decode(token_stream(tok, [EXAMPLE_HELDOUT]))
    assert len(rows) == 12
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["prompt"] + r["choices"][r["answer"]] in text  # the answer is the true continuation
        at = text.index(r["prompt"] + r["choices"][r["answer"]])
        assert at == 0 or not (text[at - 1].isalnum() or r["prompt"][0].isspace())  # starts a word, not mid-word
    assert rows == build_continuation_task(tok, [EXAMPLE_HELDOUT], n=12, seed=0)
    path = tmp_path / "task.jsonl"
    write_jsonl(rows, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows

    model = AutoModelForCausalLM.from_pretrained(EXAMPLE_MODEL, dtype=torch.float32).eval()
    got = task_accuracy(model, tok, path, batch_size=5)
    correct = 0
    for r in rows:  # independent: total log-likelihood of each option, one unpadded sequence at a time
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        lls = []
        for c in r["choices"]:
            ids = p + tok(c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            lls.append(sum(logp[t - 1, ids[t]].item() for t in range(len(p), len(ids))))
        correct += int(max(range(4), key=lls.__getitem__) == r["answer"])
    assert got["items"] == 12 and abs(got["accuracy"] - correct / 12) < 1e-9
    assert got["accuracy"] > 0.25  # the trained model beats chance on its own held-out text


def test_make_task_command_writes_both_formats(tmp_path):
    import json
    import subprocess
    import sys

    from tests.factory import EXAMPLE_HELDOUT, EXAMPLE_MODEL, ROOT

    cmd = [sys.executable, "-m", "gisp_deploy.cli", "make-task", str(EXAMPLE_MODEL), "--text", str(EXAMPLE_HELDOUT),
           "--items", "20", "--choices", "3", "--out", str(tmp_path / "t")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    margin = [json.loads(l) for l in (tmp_path / "t.margin.jsonl").read_text().splitlines()]
    answer = [json.loads(l) for l in (tmp_path / "t.answer.jsonl").read_text().splitlines()]
    assert len(margin) == len(answer) == 20
    assert all(len(r["choices"]) == 3 and a["answer"] == r["choices"][r["answer"]] for r, a in zip(margin, answer))
    p = subprocess.run(cmd[:-2] + ["--items", "100000", "--out", str(tmp_path / "big")], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 2 and "fewer than the 100000 asked for" in p.stderr
    assert not (tmp_path / "big.margin.jsonl").exists()
