"""GISP with the least-squares refit in the loop: the model each step leaves is the `--refit ls` slice."""

import numpy as np
import pytest
import torch

from gisp_deploy.artifact import load_artifact, write_artifact
from gisp_deploy.data import load_calibration
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.methods import ComputeOptions, PruneConfig, prune
from gisp_deploy.pruning.run import run_prune
from gisp_deploy.slicing.loader import load
from tests.factory import CALIB_TEXT, make_model_dir, probe_ids

CFG = dict(steps=3, max_sparsity=0.45, protect_first=0.25, protect_last=1, batch_size=4)


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _calib(path, samples=6):
    from transformers import AutoTokenizer

    return load_calibration("lm", AutoTokenizer.from_pretrained(path), [CALIB_TEXT], samples=samples, seq_len=24,
                            seed=0)


@pytest.mark.parametrize("family,compute", [("llama-gqa", "compact"), ("llama-gqa", "masked"),
                                            ("qwen2-gqa", "compact")])
def test_each_step_leaves_the_model_that_load_refit_ls_rebuilds(tmp_path, family, compute):
    path = make_model_dir(tmp_path, family)
    model, calib = _model(path), _calib(path)
    shape = ModelShape.from_config(model.config)
    probe = probe_ids(batch=2, length=12)
    seen = []  # (step, logits of the in-loop model once the step is done)

    def on_step(state):
        with torch.no_grad():
            seen.append((state.step, model(input_ids=probe).logits))

    cfg = PruneConfig(in_loop_refit="ls", **CFG)
    ranking = prune(model, shape, calib, cfg, on_step=on_step, compute=ComputeOptions(compute))
    art = load_artifact(write_artifact(tmp_path / "art", path, ranking, {"method": "gisp"}, calibration=calib))
    assert [s for s, _ in seen] == [1, 2, 3]
    for step, want in seen:
        removed = int(ranking.params[: ranking.num_covered][ranking.step[: ranking.num_covered] <= step].sum())
        sparsity = (removed - 0.5) / shape.total_params  # the prefix that ends with this step's last removal
        loaded = load(art, sparsity, refit="ls", ridge=cfg.in_loop_ridge)
        with torch.no_grad():
            got = loaded(input_ids=probe).logits
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        plain = load(art, sparsity)
        with torch.no_grad():  # and the correction is not a no-op: the plain slice differs
            assert (plain(input_ids=probe).logits - want).abs().max() > 100 * 2e-4


def test_in_loop_refit_changes_the_ranking_and_compact_equals_masked(tmp_path):
    path = make_model_dir(tmp_path, "llama-gqa")
    calib = _calib(path)
    shape = ModelShape.from_config(_model(path).config)
    loop = PruneConfig(in_loop_refit="ls", **CFG)
    compact = prune(_model(path), shape, calib, loop)
    masked = prune(_model(path), shape, calib, loop, compute=ComputeOptions("masked"))
    for field in ("layer", "kind", "index", "step"):
        assert np.array_equal(getattr(compact, field), getattr(masked, field)), field
    plain = prune(_model(path), shape, calib, PruneConfig(**CFG))
    first = [k for k in zip(plain.layer, plain.kind, plain.index, plain.step) if k[3] == 1]
    assert first == [k for k in zip(compact.layer, compact.kind, compact.index, compact.step) if k[3] == 1]
    assert not np.array_equal(plain.index[: plain.num_covered], compact.index[: compact.num_covered])


def test_the_manifest_records_the_in_loop_refit_and_options_are_checked(tmp_path):
    path = make_model_dir(tmp_path, "llama-gqa")
    cfg = PruneConfig(method="gisp", samples=4, seq_len=16, in_loop_refit="ls", **{**CFG, "steps": 2})
    run_prune(str(path), [CALIB_TEXT], tmp_path / "art", cfg, log=lambda *a: None)
    manifest = load_artifact(tmp_path / "art").manifest
    assert manifest["in_loop_refit"] == {"name": "ls", "ridge": cfg.in_loop_ridge} and cfg.in_loop_ridge > 0
    assert manifest["options"]["in_loop_refit"] == "ls"
    assert PruneConfig().in_loop_ridge is None
    for kwargs, message in (({"in_loop_refit": "ec"}, "choose none, ls"),
                            ({"in_loop_refit": "ls", "method": "magnitude"}, "takes no steps"),
                            ({"in_loop_refit": "ls", "in_loop_ridge": -1.0}, "must be >= 0")):
        with pytest.raises(ValueError, match=message):
            PruneConfig(**kwargs)
