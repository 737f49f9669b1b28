import json

import pytest
import torch
import torch.nn.functional as F

from gisp_deploy.data import DataError, load_calibration
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.objectives import (LeadingCache, fit_batch_size, largest_fitting, objective_gradient,
                                            objective_sums, scored_weights)
from tests.factory import make_model_dir, per_sequence_grads


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_model_dir(tmp_path_factory.mktemp("m"), "llama-gqa")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, ModelShape.from_config(model.config), AutoTokenizer.from_pretrained(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _manual_grad(model, weight, ids_list, target_masks, coeffs):
    """Σ c_i ∇ mean_{t in target_i} -log p(x_t | x_<t), one sequence at a time, no padding."""
    model.zero_grad()
    total = 0
    for ids, tmask, c in zip(ids_list, target_masks, coeffs):
        x = torch.tensor([ids])
        logp = F.log_softmax(model(x).logits.float(), -1)[0]  # [T, V]
        nll = [-logp[t - 1, ids[t]] for t in range(1, len(ids)) if tmask[t]]
        total = total + c * torch.stack(nll).mean()
    weight.requires_grad_(True)
    (g,) = torch.autograd.grad(total, [weight])
    return g


def test_margin_is_zero_when_options_are_identical(setup, tmp_path):
    model, shape, tok = setup
    f = _jsonl(tmp_path / "t.jsonl", [{"prompt": "The cat sat on the", "choices": [" mat", " mat"], "answer": 0}])
    calib = load_calibration("margin", tok, [f], samples=10, seq_len=64, seed=0)
    grads = objective_gradient(model, scored_weights(model, shape, "q_head"), calib, batch_size=4)
    one_side = objective_gradient(model, scored_weights(model, shape, "q_head"),
                                  load_calibration("answer", tok, [_jsonl(tmp_path / "a.jsonl", [
                                      {"prompt": "The cat sat on the", "answer": " mat"}])], 10, 64, 0), 4)
    for name, g in grads.items():  # cancels up to fp32 rounding of the batched sum
        assert g.abs().max() <= 1e-5 * one_side[name].abs().max()


def test_margin_gradient_is_positive_minus_negative_means(setup, tmp_path):
    model, shape, tok = setup
    rows = [{"prompt": "She walked to the", "choices": [" house", " river bank", " sea"], "answer": 1},
            {"prompt": "Elizabeth said", "choices": [" yes", " nothing at all"], "answer": 0}]
    calib = load_calibration("margin", tok, [_jsonl(tmp_path / "t.jsonl", rows)], samples=10, seq_len=64, seed=0)
    weights = scored_weights(model, shape, "q_head")
    got = objective_gradient(model, weights, calib, batch_size=2)  # padding across batches of mixed lengths
    seqs, masks, coeffs = [], [], []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        for j, ch in enumerate(r["choices"]):
            c = tok(ch, add_special_tokens=False)["input_ids"]
            seqs.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
            coeffs.append(+1 / 2 if j == r["answer"] else -1 / 3)  # N+ = 2 correct, N- = 3 wrong options
    for name in ("0.q_proj", "2.down_proj"):
        want = _manual_grad(model, weights[name], seqs, masks, coeffs)
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=1e-4)


def test_answer_objective_counts_answer_tokens_only(setup, tmp_path):
    model, shape, tok = setup
    rows = [{"question": "What is two plus two?", "answer": "four"}, {"prompt": "Capital of France: ", "answer": "Paris"}]
    calib = load_calibration("answer", tok, [_jsonl(tmp_path / "a.jsonl", rows)], samples=10, seq_len=64, seed=0)
    weights = scored_weights(model, shape, "q_head")
    got = objective_gradient(model, weights, calib, batch_size=2)
    seqs, masks = [], []
    for prompt, ans in (("Q: What is two plus two?\nA: ", "four"), ("Capital of France: ", "Paris")):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(ans, add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    want = _manual_grad(model, weights["1.up_proj"], seqs, masks, [0.5, 0.5])
    torch.testing.assert_close(got["1.up_proj"], want, atol=1e-6, rtol=1e-4)


def test_lm_gradient_is_mean_over_samples_and_fp32(setup):
    model, shape, tok = setup
    from tests.factory import CALIB_TEXT

    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=3, seq_len=12, seed=1)
    weights = scored_weights(model, shape, "q_head")
    got = objective_gradient(model, weights, calib, batch_size=2)
    ids = calib.input_ids.tolist()
    want = _manual_grad(model, weights["3.o_proj"], ids, [[1] * 12] * 3, [1 / 3] * 3)
    torch.testing.assert_close(got["3.o_proj"], want, atol=1e-6, rtol=1e-4)
    assert got["3.o_proj"].dtype == torch.float32
    assert "0.k_proj" not in weights  # GQA query-head scoring needs no k/v gradients


def test_leading_cache_skips_the_leading_layers_bit_identically(setup):
    model, shape, tok = setup
    from tests.factory import CALIB_TEXT

    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=5, seq_len=16, seed=2)
    calls = []
    hooks = [model.model.layers[i].register_forward_hook(lambda *_a, i=i: calls.append(i)) for i in range(4)]
    try:
        weights = scored_weights(model, shape, "q_head", [2, 3])
        plain = objective_gradient(model, weights, calib, 2)
        leading = LeadingCache(2)
        calls.clear()
        first = objective_gradient(model, weights, calib, 2, leading=leading)  # records the outputs of layer 1
        assert calls == [0, 1, 2, 3] * 3 and len(leading.hidden) == 3 and leading.nbytes == 5 * 16 * 32 * 4
        calls.clear()
        again = objective_gradient(model, weights, calib, 2, leading=leading)  # starts at layer 2
        assert calls == [2, 3] * 3
        assert len(model.model.layers) == 4  # the layers are put back
        calls.clear()
        full = objective_gradient(model, scored_weights(model, shape, "q_head"), calib, 2, leading=leading)
        assert calls == [0, 1, 2, 3] * 3  # gradients of layers 0-1 asked for: nothing skipped
        objective_gradient(model, weights, calib, 4, leading=leading)  # another micro-batch: recorded anew
        assert leading.batch_size == 4 and len(leading.hidden) == 2
    finally:
        for h in hooks:
            h.remove()
    for key in weights:
        assert torch.equal(first[key], plain[key]) and torch.equal(again[key], plain[key]), key
        assert torch.equal(full[key], plain[key]), key


def test_bad_jsonl_records(setup, tmp_path):
    _, _, tok = setup
    bad = _jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(DataError, match="'answer' must index"):
        load_calibration("margin", tok, [bad], 4, 32, 0)
    with pytest.raises(DataError, match="need 'prompt'"):
        load_calibration("answer", tok, [_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])], 4, 32, 0)
    broken = tmp_path / "d.jsonl"
    broken.write_text('{"prompt": "x",\n')
    with pytest.raises(DataError, match="d.jsonl:1: invalid JSON"):
        load_calibration("answer", tok, [broken], 4, 32, 0)


def test_micro_batch_fitting(setup):
    model, shape, tok = setup
    from tests.factory import CALIB_TEXT

    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=40, seq_len=8, seed=0)
    assert fit_batch_size(model, scored_weights(model, shape, "q_head"), calib) == 16  # CPU: no probing
    tried = []

    def runs(size):  # a GPU on which 12 sequences fit
        tried.append(size)
        if size > 12:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert largest_fitting(40, runs) == 8 and tried == [32, 16, 8]
    with pytest.raises(torch.OutOfMemoryError):
        largest_fitting(64, lambda size: runs(99))


def _weighted_sums(per_seq, weights, key):
    """Σ_i w_i g_i and Σ_i w_i g_i² of one weight, from each sequence's own gradient."""
    grad = sum(w * g[key] for w, g in zip(weights, per_seq))
    fisher = sum(w * g[key] ** 2 for w, g in zip(weights, per_seq))
    return grad, fisher


@pytest.mark.parametrize("objective", ["lm", "answer"])
def test_fisher_is_the_weighted_sum_of_each_sequence_own_squared_gradient(setup, tmp_path, objective):
    model, shape, tok = setup
    from tests.factory import CALIB_TEXT

    if objective == "lm":
        calib = load_calibration("lm", tok, [CALIB_TEXT], samples=5, seq_len=12, seed=1)
    else:  # sequences of different lengths: padding inside micro-batches
        rows = [{"prompt": "Q: what is two plus two", "answer": " four"}, {"prompt": "Capital of France:",
                "answer": " Paris, of course"}, {"prompt": "The cat", "answer": " sat on the mat"}]
        calib = load_calibration("answer", tok, [_jsonl(tmp_path / "a.jsonl", rows)], 10, 64, 0)
    weights = scored_weights(model, shape, "q_head")
    per_seq = per_sequence_grads(model, weights, calib)
    seq_weights = calib.weight.tolist()
    for batch_size in (1, 2, len(seq_weights)):  # the micro-batch changes neither sum
        sums = objective_sums(model, weights, calib, batch_size, fisher=True)
        for key in ("0.q_proj", "1.o_proj", "2.gate_proj", "3.down_proj"):
            grad, fisher = _weighted_sums(per_seq, seq_weights, key)
            assert sums.fisher[key].dtype == torch.float32
            torch.testing.assert_close(sums.grad[key], grad, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(sums.fisher[key], fisher, atol=1e-6 * float(fisher.max()), rtol=1e-4)
            # not the square of the mean gradient, which a batch-level estimate would give
            assert (fisher - grad ** 2).abs().max() > 0.1 * fisher.abs().max()
    assert objective_sums(model, weights, calib, 2).fisher is None


def test_fisher_from_the_leading_cache_equals_the_full_pass(setup):
    model, shape, tok = setup
    from tests.factory import CALIB_TEXT

    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=5, seq_len=16, seed=2)
    weights = scored_weights(model, shape, "q_head", [2, 3])
    plain = objective_sums(model, weights, calib, 2, fisher=True)
    leading = LeadingCache(2)
    objective_sums(model, weights, calib, 2, leading=leading, fisher=True)  # records
    replayed = objective_sums(model, weights, calib, 2, leading=leading, fisher=True)  # starts at layer 2
    for key in weights:
        assert torch.equal(replayed.fisher[key], plain.fisher[key]), key
