"""Compact slices with deployment rounding, and through lm-eval's HF wrapper, against the oracle."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gisp_deploy.artifact import load_artifact, write_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.plan import plan_slice
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.slicing.loader import load
from gisp_deploy.slicing.oracle import apply_oracle
from tests.factory import make_model_dir


def _artifact(root, name, unit, **overrides):
    from transformers import AutoModelForCausalLM

    model_dir = make_model_dir(root, name, **overrides)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shape = ModelShape.from_config(dense.config)
    ranking = prune(dense, shape, None, PruneConfig(method="random", unit=unit, max_sparsity=0.7, protect_first=0,
                                                   protect_last=0, seed=5))
    return dense, load_artifact(write_artifact(root / "art", model_dir, ranking, {"method": "random"}))


@pytest.mark.parametrize("name,unit", [("llama-gqa", "q_head"), ("qwen2-gqa", "kv_group"), ("qwen3-gqa", "q_head")])
def test_rounded_slices_match_oracle(tmp_path, name, unit):
    dense, art = _artifact(tmp_path, name, unit, num_attention_heads=8, num_key_value_heads=4, head_dim=4,
                           intermediate_size=80)
    ids = torch.randint(3, 8000, (2, 12), generator=torch.Generator().manual_seed(0))
    for s in (0.2, 0.45, 0.65):
        for tp, cm in ((2, 16), (4, 1)):
            plan = plan_slice(art.ranking, s, tp_size=tp, channel_multiple=cm)
            compact = load(art, plan=plan)
            oracle = copy.deepcopy(dense)
            apply_oracle(oracle, plan)
            with torch.no_grad():
                torch.testing.assert_close(compact(ids).logits, oracle(ids).logits, atol=1e-5, rtol=1e-5)
            gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
            assert torch.equal(compact.generate(ids, **gen), oracle.generate(ids, **gen))
            for layer, lp in zip(compact.model.layers, plan.layers):
                if lp.channels:
                    assert layer.mlp.gate_proj.out_features % cm == 0 or len(lp.channels) == 80


def test_lm_eval_hf_wrapper_takes_the_compact_model(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    dense, art = _artifact(tmp_path, "llama-gqa", "q_head")
    tok = AutoTokenizer.from_pretrained(art.path)
    compact = load(art, 0.4)
    lm = HFLM(pretrained=compact, tokenizer=tok, batch_size=2)
    pairs = [("It is a truth universally", " acknowledged"), ("Anne Elliot was", " a woman of sense")]
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                            for i, p in enumerate(pairs)])
    oracle = copy.deepcopy(dense)
    apply_oracle(oracle, plan_slice(art.ranking, 0.4))
    for (ctx, cont), (ll, _greedy) in zip(pairs, got):
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        ids = c + tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(oracle(torch.tensor([ids])).logits[0].float(), -1)
        want = sum(logp[t - 1, ids[t]].item() for t in range(len(c), len(ids)))
        assert ll == pytest.approx(want, abs=1e-4)
