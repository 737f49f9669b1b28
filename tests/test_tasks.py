import json

import torch
import torch.nn.functional as F

from gisp_deploy.data import token_stream
from gisp_deploy.tasks import build_continuation_task, task_accuracy, write_jsonl
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
