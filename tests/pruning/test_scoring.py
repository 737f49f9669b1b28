"""Second-order score options: each structure's score from explicit per-sequence gradients, computed apart."""

import pytest
import torch

from gisp_deploy.arguments import SCORES, check_score
from gisp_deploy.data import load_calibration
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.methods import PruneConfig
from gisp_deploy.pruning.objectives import objective_sums, scored_weights
from gisp_deploy.pruning.scoring import gradient_scores, scores_kv
from tests.factory import CALIB_TEXT, make_model_dir, per_sequence_grads


def _term(weight, grad, fisher, score):
    """The Taylor terms of zeroing each weight, written out: ΔL ≈ −G·W + ½ F·W²."""
    if score == "first":
        return (grad * weight).abs()
    if score == "second":
        return 0.5 * fisher * weight ** 2
    return (-grad * weight + 0.5 * fisher * weight ** 2).abs()


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-mha"])
@pytest.mark.parametrize("score", SCORES)
def test_structure_scores_from_explicit_per_sequence_gradients(tmp_path, family, score):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_model_dir(tmp_path, family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    shape, tok = ModelShape.from_config(model.config), AutoTokenizer.from_pretrained(path)
    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=4, seq_len=12, seed=3)
    weights = scored_weights(model, shape, "q_head")
    sums = objective_sums(model, weights, calib, batch_size=3, fisher=True)
    heads, channels = gradient_scores(model, shape, "q_head", sums.grad, fisher=sums.fisher, score=score)

    per_seq = per_sequence_grads(model, weights, calib)
    w_seq = calib.weight.tolist()

    def term(layer, proj):  # [out, in] per-weight term from the independent gradients
        grad = sum(w * g[f"{layer}.{proj}"] for w, g in zip(w_seq, per_seq))
        fisher = sum(w * g[f"{layer}.{proj}"] ** 2 for w, g in zip(w_seq, per_seq))
        return _term(weights[f"{layer}.{proj}"].detach(), grad, fisher, score)

    hd, layer = shape.head_dim, 1
    gate, up, down = term(layer, "gate_proj"), term(layer, "up_proj"), term(layer, "down_proj")
    want_channels = gate.sum(1) + up.sum(1) + down.sum(0)  # [I]: row j of gate and up, column j of down
    q, o = term(layer, "q_proj"), term(layer, "o_proj")
    want_heads = torch.stack([q[h * hd:(h + 1) * hd].sum() + o[:, h * hd:(h + 1) * hd].sum()
                              for h in range(shape.num_heads)])  # [H]
    if scores_kv(shape, "q_head"):  # MHA: head h owns k/v rows h too
        k, v = term(layer, "k_proj"), term(layer, "v_proj")
        want_heads += torch.stack([k[h * hd:(h + 1) * hd].sum() + v[h * hd:(h + 1) * hd].sum()
                                   for h in range(shape.num_heads)])
    for got, want in ((channels[layer], want_channels), (heads[layer], want_heads)):
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-6 * float(want.max()))
    if score != "first":  # the curvature term shows: these scores are not the first-order ones
        first_c = gradient_scores(model, shape, "q_head", sums.grad)[1]
        assert (channels - first_c).abs().max() > 1e-3 * first_c.abs().max()


def test_score_options_are_checked():
    for score in SCORES:
        assert check_score(score) == score
    for kwargs, message in (({"score": "third"}, "choose first, second, mix"),
                            ({"score": "mix", "method": "wanda-sp"}, "applies to gisp and oneshot"),
                            ({"score": "second", "objective": "margin"}, "needs a loss to expand")):
        with pytest.raises(ValueError, match=message):
            PruneConfig(**kwargs)
    assert PruneConfig(method="oneshot", score="second").score == "second"
    assert PruneConfig(method="wanda-sp").score == "first"
