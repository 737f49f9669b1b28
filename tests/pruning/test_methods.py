import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gisp_deploy.artifact import load_artifact
from gisp_deploy.data import load_calibration
from gisp_deploy.families import ModelShape
from gisp_deploy.plan import plan_slice
from gisp_deploy.pruning.methods import METHODS, ComputeOptions, PruneConfig, prune
from gisp_deploy.pruning.progress import partial_dir
from gisp_deploy.pruning.run import run_prune
from gisp_deploy.ranking import CHANNEL
from tests.factory import CALIB_TEXT, EXAMPLE_MODEL, FAMILIES, make_model_dir


def _setup(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, ModelShape.from_config(model.config), tok


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_every_family(tmp_path, family, method):
    model, shape, tok = _setup(make_model_dir(tmp_path, family))
    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=4, seq_len=16, seed=0)
    cfg = PruneConfig(method=method, steps=3, max_sparsity=0.5, protect_first=0.25, protect_last=1, batch_size=2)
    ranking = prune(model, shape, calib, cfg)
    assert ranking.coverage >= 0.5
    plan = plan_slice(ranking, 0.5)
    assert plan.achieved_sparsity >= 0.5
    if method == "gisp":
        assert sorted(set(ranking.step[: ranking.num_covered].tolist())) == [1, 2, 3]
    if method == "wanda-sp":  # per-layer uniform: every pruned layer loses about the same channel fraction
        widths = [len(plan.layers[l].channels) for l in range(1, shape.num_layers - 1)]
        assert max(widths) - min(widths) <= 2


def test_magnitude_removes_the_smallest_sums_of_weights_first(tmp_path):
    model, shape, _ = _setup(make_model_dir(tmp_path, "llama-mha"))
    ranking = prune(model, shape, None, PruneConfig(method="magnitude", max_sparsity=0.5, protect_first=0,
                                                   protect_last=0))
    first = [(l, i, sc) for l, k, i, sc in zip(ranking.layer, ranking.kind, ranking.index, ranking.score)
             if k == CHANNEL][:5]
    for layer, index, score in first:  # Σ|W| over the channel's gate row, up row and down column, per weight
        mlp = model.model.layers[int(layer)].mlp
        want = (mlp.gate_proj.weight[index].abs().sum() + mlp.up_proj.weight[index].abs().sum()
                + mlp.down_proj.weight[:, index].abs().sum()).item() / (3 * shape.hidden)
        assert score == pytest.approx(want, rel=1e-5)
    covered = ranking.score[: ranking.num_covered]
    assert np.all(np.diff(covered) >= 0)  # one shot: removed in ascending score
    everything = [(mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
                   + mlp.down_proj.weight.abs().sum(0)).min().item() / (3 * shape.hidden)
                  for mlp in (b.mlp for b in model.model.layers)]
    assert first[0][2] == pytest.approx(min(everything), rel=1e-5)


def test_random_is_seeded(tmp_path):
    from transformers import AutoConfig

    shape = ModelShape.from_config(AutoConfig.from_pretrained(make_model_dir(tmp_path, "llama-gqa")))

    def order(seed):
        r = prune(None, shape, None, PruneConfig(method="random", seed=seed, max_sparsity=0.5, protect_first=0,
                                                 protect_last=0))
        return list(zip(r.layer.tolist(), r.kind.tolist(), r.index.tolist()))

    assert order(0) == order(0) and order(0) != order(1)


def test_gisp_step_targets_are_linear_in_params(tmp_path):
    model, shape, tok = _setup(make_model_dir(tmp_path, "llama-gqa"))
    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=4, seq_len=16, seed=0)
    ranking = prune(model, shape, calib, PruneConfig(steps=4, max_sparsity=0.4, protect_first=0, protect_last=0),
                    compute=ComputeOptions("masked"))
    cum = ranking.cumulative_params
    one = ranking.params.max() / shape.total_params
    for step in (1, 2, 3, 4):
        last = np.nonzero(ranking.step == step)[0].max()
        reached = cum[last] / shape.total_params
        assert 0.1 * step <= reached < 0.1 * step + one  # overshoot by less than one structure
    # iterative: under masked compute, removed structures really are zero in the model afterwards
    plan = plan_slice(ranking, ranking.coverage)
    for layer, lp in zip(model.model.layers, plan.layers):
        gone = sorted(set(range(shape.intermediate)) - set(lp.channels))
        assert torch.all(layer.mlp.down_proj.weight[:, gone] == 0)


def test_oneshot_equals_gisp_with_one_step(tmp_path):
    path = make_model_dir(tmp_path, "qwen2-gqa")
    rankings = []
    for cfg in (PruneConfig(method="oneshot", max_sparsity=0.5), PruneConfig(method="gisp", steps=1, max_sparsity=0.5)):
        model, shape, tok = _setup(path)
        calib = load_calibration("lm", tok, [CALIB_TEXT], samples=4, seq_len=16, seed=0)
        rankings.append(prune(model, shape, calib, cfg))
    np.testing.assert_array_equal(rankings[0].index, rankings[1].index)
    np.testing.assert_array_equal(rankings[0].layer, rankings[1].layer)


def test_structures_schedule_removes_equal_counts(tmp_path):
    model, shape, tok = _setup(make_model_dir(tmp_path, "llama-mha"))
    calib = load_calibration("lm", tok, [CALIB_TEXT], samples=4, seq_len=16, seed=0)
    passes = []
    ranking = prune(model, shape, calib, PruneConfig(steps=4, schedule="structures", max_sparsity=0.4,
                                                     protect_first=0, protect_last=0),
                    on_pass=lambda description, total: passes.append(description))
    counts = np.bincount(ranking.step[: ranking.num_covered])[1:]
    assert ranking.coverage >= 0.4
    assert len(set(counts[:-1].tolist())) == 1 and counts[-1] <= counts[0]
    # it stops at the parameter target, not at --steps (here after 6: channels are small); the progress says so
    assert len(counts) > 4
    assert passes == [f"step {k}/4 scoring" if k <= 4 else f"step {k} (past --steps 4) scoring"
                      for k in range(1, len(counts) + 1)]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "gisp_deploy.cli", *map(str, args)], capture_output=True, text=True,
                          **kw)


def _ranking_columns(art):
    with safe_open(str(art / "ranking.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_ranking(tmp_path):
    args = ["prune", EXAMPLE_MODEL, "--calib", CALIB_TEXT, "--samples", "16", "--seq-len", "64", "--batch-size", "8",
            "--steps", "5", "--max-sparsity", "0.3", "--dtype", "float32", "--device", "cpu"]
    ref = _cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    state = partial_dir(out) / "state.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "gisp_deploy.cli", *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            with safe_open(str(state), framework="pt") as f:
                step = int(f.metadata()["step"])
            if step >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None and killed_at < 5, "the run finished before it could be killed"
    assert not out.exists()  # nothing half-written under the final name
    again = _cli(*args, "--out", out)
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to silently start over
    resumed = _cli(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {killed_at}" in resumed.stderr
    a, b = _ranking_columns(tmp_path / "ref"), _ranking_columns(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not partial_dir(out).exists()
    assert load_artifact(out).ranking.coverage >= 0.3


def test_resume_refuses_changed_options(tmp_path):
    model_dir = make_model_dir(tmp_path, "llama-gqa")
    out = tmp_path / "art"
    partial_dir(out).mkdir()
    (partial_dir(out) / "run.json").write_text(json.dumps({"config": {"steps": 99}}))
    with pytest.raises(ValueError, match="differs from the saved one"):
        run_prune(str(model_dir), [CALIB_TEXT], out, PruneConfig(samples=2, seq_len=16), resume=True)


@pytest.mark.slow
def test_ctrl_c_keeps_progress_and_says_how_to_resume(tmp_path):
    args = ["prune", EXAMPLE_MODEL, "--calib", CALIB_TEXT, "--samples", "16", "--seq-len", "64", "--batch-size", "8",
            "--steps", "5", "--max-sparsity", "0.3", "--dtype", "float32", "--device", "cpu", "--out", tmp_path / "a"]
    state = partial_dir(tmp_path / "a") / "state.safetensors"
    # a background CI shell starts us with SIGINT ignored, which the child would inherit: restore the default
    proc = subprocess.Popen([sys.executable, "-m", "gisp_deploy.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not state.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err
    assert state.exists() and not (tmp_path / "a").exists()
    resumed = _cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert load_artifact(tmp_path / "a").ranking.coverage >= 0.3
