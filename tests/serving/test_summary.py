"""serve's banner counts (serving.summary) without transformers: the parameters and KV bytes of the model the
budget builds on the meta device, for every family, from config.json alone or from transformers' defaults."""

import json
import shutil
import subprocess
import sys

import pytest

from gisp_deploy.artifact import load_artifact
from gisp_deploy.budget import slice_cost
from gisp_deploy.modeling import padding_params
from gisp_deploy.plan import plan_slice
from gisp_deploy.serving.summary import slice_summary
from tests.factory import VLLM_MODELS


@pytest.mark.parametrize("name", list(VLLM_MODELS))
@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_the_summary_counts_what_the_compact_model_holds(artifacts, name, sparsity):
    art = load_artifact(artifacts(name))
    plan = plan_slice(art.ranking, sparsity)
    cost = slice_cost(art.config, plan, dtype="bfloat16")
    got = slice_summary(art.path, sparsity, dtype="bfloat16")
    empty_blocks = sum((not lp.q_heads) + (not lp.channels) for lp in plan.layers)
    assert empty_blocks or sparsity < 0.5  # the case below is exercised
    # vLLM's layer holds no norm before a block it lacks; transformers' compact layer keeps it (budget counts that)
    assert got.parameters == cost.parameters - empty_blocks * art.shape.hidden
    assert got.kv_bytes_per_token == cost.kv_bytes_per_token
    assert got.padding_parameters == padding_params(plan)


def test_a_config_that_leaves_counted_values_to_defaults_is_counted_by_transformers(artifacts, tmp_path):
    """tie_word_embeddings left out of config.json: the summary asks transformers' config, as loading would."""
    src = artifacts("llama-bias")  # ties its embeddings: one matrix fewer than the class default says
    want = slice_summary(src, 0.4)
    copy = shutil.copytree(src, tmp_path / "art")
    cfg = json.loads((copy / "config.json").read_text())
    assert cfg.pop("tie_word_embeddings") is True
    (copy / "config.json").write_text(json.dumps(cfg))
    got = slice_summary(copy, 0.4, verify=False)
    vocab_matrix = cfg["vocab_size"] * cfg["hidden_size"]
    assert got.parameters == want.parameters + vocab_matrix and got.dense_parameters == want.dense_parameters + vocab_matrix


def test_the_summary_of_a_complete_config_imports_no_torch(artifacts):
    code = ("import sys\nfrom gisp_deploy.serving.summary import slice_summary\n"
            f"s = slice_summary({str(artifacts('qwen3-gqa'))!r}, 0.4)\n"
            "print(s.parameters, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split()[1:] == ["[]"] and int(out.split()[0]) > 0
