"""Fixtures of the serving tests: artifacts of every family, and one `gisp-deploy serve` per module."""

import os
import signal

import pytest

from gisp_deploy.artifact import write_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.methods import PruneConfig, prune
from tests.factory import CHAT_TEMPLATE, VLLM_MODELS, VLLM_SHAPE, Server, calibration_windows, make_model_dir

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process: start in ~2 s, not ~19 s
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # TP=2 on one NUMA node of 2 CPUs


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """get(name, unit, copy_weights=True, calibrated=False) -> artifact path (random ranking, every layer prunable,
    to 0.7; `calibrated`: with calibration windows, for corrected slices)."""
    root = tmp_path_factory.mktemp("vllm-models")
    made = {}

    def get(name, unit="q_head", copy_weights=True, calibrated=False):
        key = (name, unit, copy_weights, calibrated)
        if key not in made:
            family, overrides = VLLM_MODELS[name]
            model_dir = root / name / family
            if not model_dir.exists():
                model_dir = make_model_dir(root / name, family, **{**VLLM_SHAPE, **overrides})
                (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
            from transformers import AutoConfig

            shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
            ranking = prune(None, shape, None, PruneConfig(method="random", unit=unit, max_sparsity=0.7,
                                                           protect_first=0, protect_last=0))
            out = root / f"{name}-{unit}{'' if copy_weights else '-ref'}{'-calibrated' if calibrated else ''}"
            made[key] = write_artifact(out, model_dir, ranking, {"method": "random"}, copy_weights=copy_weights,
                                       calibration=calibration_windows(length=32) if calibrated else None)
        return made[key]
    return get


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    path = artifacts("llama-gqa")
    srv = Server(path, ["--sparsity", "0.4"], tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop(signal.SIGINT)


FIT_OPTIONS = dict(max_model_len=256, max_num_seqs=2, dtype="float32", reserve="0")  # small and fast in vLLM


@pytest.fixture(scope="module")
def middle_budget(artifacts):
    """(artifact, bytes, fit's options): a memory budget that binds between the dense model and sparsity 0.2."""
    from gisp_deploy.budget import fit

    path = artifacts("llama-gqa")
    dense = fit(path, memory=10 << 30, **FIT_OPTIONS)  # candidates: dense, 0.1, 0.2
    return path, (dense.cost.memory + dense.candidates[-1].cost.memory) // 2, dict(FIT_OPTIONS)
