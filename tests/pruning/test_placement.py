"""Scoring on a GPU: the fitted micro-batch, and layers split between the GPU and CPU memory (accelerate)."""

import pytest
import torch

from gisp_deploy.data import load_calibration
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.pruning.objectives import fit_batch_size, scored_weights
from gisp_deploy.pruning.placement import load_placed, plan_placement
from tests.factory import CALIB_TEXT, make_model_dir

pytestmark = pytest.mark.gpu


def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def test_fitted_micro_batch_is_a_power_of_two_that_runs(tmp_path):
    _needs_cuda()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_model_dir(tmp_path, "llama-gqa")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    calib = load_calibration("lm", AutoTokenizer.from_pretrained(path), [CALIB_TEXT], samples=40, seq_len=32, seed=0)
    size = fit_batch_size(model, scored_weights(model, ModelShape.from_config(model.config), "q_head"), calib)
    assert size == 32  # the largest power of two within 40 samples; a tiny model always fits


def test_layers_split_between_gpu_and_cpu_rank_like_one_device(tmp_path):
    _needs_cuda()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_model_dir(tmp_path, "llama-gqa", num_hidden_layers=6)
    layer_bytes = 4 * sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).model.layers[0].parameters())
    embed_bytes = 4 * 8192 * 32 * 2
    placement = plan_placement(path, torch.float32, "sequential",
                               max_memory={0: embed_bytes + 3 * layer_bytes, "cpu": 2**34})
    assert {0, "cpu"} <= set(placement.values()), placement
    split = load_placed(path, torch.float32, placement)
    devices = {p.device.type for p in split.parameters()}
    assert devices == {"cuda", "cpu"}
    shape = ModelShape.from_config(split.config)
    calib = load_calibration("lm", AutoTokenizer.from_pretrained(path), [CALIB_TEXT], samples=8, seq_len=32, seed=0)
    cfg = PruneConfig(steps=3, max_sparsity=0.4, protect_first=0.2, protect_last=1, batch_size=4)
    got = prune(split, shape, calib, cfg)
    want = prune(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), shape, calib, cfg)
    n = want.num_covered
    assert got.num_covered == n
    same = sum(a == b for a, b in zip(zip(got.layer[:n], got.kind[:n], got.index[:n]),
                                      zip(want.layer[:n], want.kind[:n], want.index[:n])))
    assert same >= 0.95 * n  # GPU and CPU matmuls round differently: near-ties may swap, nothing more
    assert set(got.step[:n].tolist()) == {1, 2, 3}
