"""The shrinking model GISP scores: same outputs and scores as the masked model, same rankings."""

import numpy as np
import pytest
import torch

from gisp_deploy.data import load_calibration
from gisp_deploy.families import ModelShape
from gisp_deploy.plan import LayerPlan, SlicePlan, kept_structures
from gisp_deploy.pruning.methods import ComputeOptions, PruneConfig, prune
from gisp_deploy.arguments import SCORES
from gisp_deploy.pruning.objectives import objective_gradient, objective_sums, scored_weights
from gisp_deploy.pruning.scoring import gradient_scores, scores_kv
from gisp_deploy.pruning.shrinking import ShrinkingModel
from gisp_deploy.ranking import CHANNEL, HEAD
from gisp_deploy.slicing.oracle import apply_oracle
from tests.factory import CALIB_TEXT, FAMILIES, make_model_dir


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, ModelShape.from_config(model.config), AutoTokenizer.from_pretrained(path)


def _removals(shape, unit, seed):
    """A removal set in which layer 1 loses every head, layer 2 every channel, layer 3 a random part."""
    gen = torch.Generator().manual_seed(seed)
    units = shape.num_kv_heads if unit == "kv_group" else shape.num_heads
    out = [(1, HEAD, u) for u in range(units)] + [(2, CHANNEL, c) for c in range(shape.intermediate)]
    out += [(3, HEAD, int(u)) for u in torch.randperm(units, generator=gen)[: units // 2]]
    out += [(3, CHANNEL, int(c)) for c in torch.randperm(shape.intermediate, generator=gen)[:17]]
    out += [(2, HEAD, int(torch.randint(units, (1,), generator=gen)))]
    return out


def _oracle_plan(shape, unit, removed):
    layers = tuple(LayerPlan(q, tuple(sorted({h // shape.group_size for h in q})), c)
                   for q, c in kept_structures(shape, unit, removed))
    return SlicePlan(shape=shape, unit=unit, sparsity=0.0, achieved_sparsity=0.0, prefix=0, layers=layers)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("unit", ["q_head", "kv_group"])
@pytest.mark.parametrize("channel_multiple", [1, 16])
def test_cut_model_computes_the_masked_model_and_its_scores(tmp_path, family, unit, channel_multiple):
    path = make_model_dir(tmp_path, family)
    masked, shape, tok = _load(path)
    compact, _, _ = _load(path)
    removed = _removals(shape, unit, seed=len(family))
    apply_oracle(masked, _oracle_plan(shape, unit, removed))
    shrinking = ShrinkingModel(compact, shape, unit, channel_multiple)
    shrinking.cut(removed[:5])  # shrinking twice: the second cut gathers from an already compact layer
    shrinking.cut(removed)
    assert type(compact.model.layers[1].self_attn).__name__ == "EmptyAttention"
    assert type(compact.model.layers[2].mlp).__name__ == "EmptyMLP"
    n_ch = len(compact.model.layers[3].mlp.up_proj.weight)
    assert n_ch % channel_multiple == 0 or n_ch == shape.intermediate

    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=3, seq_len=20, seed=1)
    with torch.no_grad():
        want = masked(input_ids=calib.input_ids).logits
        got = compact(input_ids=calib.input_ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    layers = [0, 2, 3]
    with_kv = scores_kv(shape, unit)
    g_masked = objective_sums(masked, scored_weights(masked, shape, unit, layers), calib, 2, fisher=True)
    g_compact = objective_sums(compact, shrinking.weights(layers, with_kv), calib, 2, fisher=True)
    for score in SCORES:
        want_h, want_c = gradient_scores(masked, shape, unit, g_masked.grad, layers, g_masked.fisher, score)
        got_h, got_c = shrinking.scores(g_compact.grad, layers, with_kv, g_compact.fisher, score)
        torch.testing.assert_close(got_h, want_h, rtol=1e-4, atol=1e-9 * float(want_h.abs().max()))
        torch.testing.assert_close(got_c, want_c, rtol=1e-4, atol=1e-9 * float(want_c.abs().max()))
        assert got_c[2].abs().max() == 0 and got_h[1].abs().max() == 0  # gone, and layer 1 not asked for


@pytest.mark.parametrize("family,unit,schedule,score", [("llama-gqa", "q_head", "params", "first"),
                                                        ("qwen2-gqa", "kv_group", "structures", "first"),
                                                        ("qwen3-gqa", "q_head", "structures", "first"),
                                                        ("llama-mha", "q_head", "params", "first"),
                                                        ("llama-gqa", "q_head", "params", "mix"),
                                                        ("qwen2-mha", "q_head", "structures", "second")])
def test_compact_and_masked_scoring_give_the_same_ranking_in_fp32(tmp_path, family, unit, schedule, score):
    path = make_model_dir(tmp_path, family)
    _, shape, tok = _load(path)
    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=6, seq_len=24, seed=0)
    cfg = PruneConfig(unit=unit, steps=4, max_sparsity=0.45, protect_first=0.25, protect_last=1, batch_size=4,
                      schedule=schedule, score=score)
    masked = prune(_load(path)[0], shape, calib, cfg, compute=ComputeOptions("masked"))
    for multiple in (1, 16):
        compact = prune(_load(path)[0], shape, calib, cfg, compute=ComputeOptions("compact", multiple))
        for field in ("layer", "kind", "index", "step", "params"):
            assert np.array_equal(getattr(compact, field), getattr(masked, field)), field
        np.testing.assert_allclose(compact.score, masked.score, rtol=1e-5)
        assert compact.num_covered == masked.num_covered


def test_bf16_scores_equal_up_to_rounding(tmp_path):
    """One scoring pass in bf16 on a model with structures cut out vs the same structures zeroed."""
    path = make_model_dir(tmp_path, "llama-gqa", intermediate_size=256, hidden_size=64)
    masked, shape, tok = _load(path, torch.bfloat16)
    compact, _, _ = _load(path, torch.bfloat16)
    removed = [(l, k, i) for l, k, i in _removals(shape, "q_head", seed=3) if l == 3]
    apply_oracle(masked, _oracle_plan(shape, "q_head", removed))
    shrinking = ShrinkingModel(compact, shape, "q_head", 64)
    shrinking.cut(removed)
    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=8, seq_len=32, seed=2)
    layers = range(shape.num_layers)
    want_h, want_c = gradient_scores(masked, shape, "q_head",
                                     objective_gradient(masked, scored_weights(masked, shape, "q_head"), calib, 4))
    got_h, got_c = shrinking.scores(objective_gradient(compact, shrinking.weights(layers, False), calib, 4),
                                    layers, False)
    for got, want in ((got_h, want_h), (got_c, want_c)):
        assert torch.equal(got == 0, want == 0)  # the same structures are gone
        rel = (got - want).abs() / want.abs().clamp_min(1e-30)
        assert rel.max() < 0.02, rel.max()  # bf16 keeps 8 significant bits: 0.4% per rounding
        assert np.corrcoef(got.flatten(), want.flatten())[0, 1] > 0.999


@pytest.mark.parametrize("schedule", ["params", "structures"])
def test_protected_layers_get_gradients_only_for_the_last_step(tmp_path, monkeypatch, schedule):
    from gisp_deploy.pruning import methods

    path = make_model_dir(tmp_path, "llama-gqa")
    model, shape, tok = _load(path)
    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=4, seq_len=16, seed=0)
    asked = []
    real = methods.objective_sums

    def spy(model, weights, *args, **kw):
        asked.append(sorted({int(k.split(".")[0]) for k in weights}))
        return real(model, weights, *args, **kw)

    monkeypatch.setattr(methods, "objective_sums", spy)
    cfg = PruneConfig(steps=3, max_sparsity=0.4, protect_first=0.25, protect_last=1, batch_size=2, schedule=schedule)
    ranking = prune(model, shape, calib, cfg)
    if schedule == "params":  # the last step is known in advance: it scores every layer
        assert asked == [[1, 2], [1, 2], [0, 1, 2, 3]]
    else:  # known once a step reached the target: one more pass, for the protected layers, on that step's model
        assert asked[:-1] == [[1, 2]] * (len(asked) - 1) and asked[-1] == [0, 3] and len(asked) >= 4
    tail = ranking.layer[ranking.num_covered:]
    assert set(tail.tolist()) >= {0, 3}
    assert np.all(ranking.score[ranking.num_covered:][np.isin(tail, [0, 3])] > 0)  # ordered by real scores
    monkeypatch.undo()
    masked = prune(_load(path)[0], shape, calib, cfg, compute=ComputeOptions("masked"))
    for field in ("layer", "kind", "index", "step"):
        assert np.array_equal(getattr(ranking, field), getattr(masked, field)), field
