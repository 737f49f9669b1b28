"""Data-parallel scoring under torchrun (gloo on CPU here, NCCL on GPUs): the same ranking as one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from gisp_deploy.artifact import load_artifact
from gisp_deploy.data import Calibration
from gisp_deploy.pruning.distributed import Ranks
from tests.factory import CALIB_TEXT, make_model_dir


def test_ranks_from_env_and_shards(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert Ranks.from_env() == Ranks() and Ranks().is_main
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ranks = Ranks.from_env()
    assert (ranks.rank, ranks.world, ranks.is_main) == (2, 3, False)
    ids = torch.arange(7 * 4).reshape(7, 4)
    calib = Calibration(ids, ids, ids, torch.full((7,), 1 / 7, dtype=torch.float64), "lm", ())
    parts = [Ranks(r, 3).shard(calib) for r in range(3)]
    assert sorted(torch.cat([p.input_ids for p in parts])[:, 0].tolist()) == ids[:, 0].tolist()
    assert all(torch.all(p.weight == 1 / 7) for p in parts)  # global weights: the sums add up to Ḡ
    second = Ranks(rank=1, world=2, local_rank=1)  # one GPU per process: its own, whatever was asked
    assert second.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert second.device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        second.device(torch.device("cuda", 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_rank_like_one(tmp_path):
    model = make_model_dir(tmp_path, "llama-gqa")
    opts = ["prune", model, "--calib", CALIB_TEXT, "--samples", "10", "--seq-len", "32", "--steps", "3",
            "--max-sparsity", "0.4", "--device", "cpu", "--schedule", "structures"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), "-m", "gisp_deploy.cli",
                          *map(str, opts), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    out = two.stdout + two.stderr
    assert out.count("wrote ") == 1 and "by 2 processes" in out and "micro-batch: 5 sequences" in out
    one = subprocess.run([sys.executable, "-m", "gisp_deploy.cli", *map(str, opts), "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_artifact(tmp_path / "one"), load_artifact(tmp_path / "two")
    ra, rb = a.ranking, b.ranking
    n = ra.num_covered
    assert rb.num_covered == n and n > 0
    for field in ("layer", "kind", "index", "step", "params"):
        assert np.array_equal(getattr(ra, field), getattr(rb, field)), field
    np.testing.assert_allclose(rb.score, ra.score, rtol=1e-5)  # sums of two halves: rounding apart, no more
    assert b.manifest["run"]["processes"] == 2
    assert b.manifest["run"]["tokens_scored"] == a.manifest["run"]["tokens_scored"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-gqa", "one", "two"]  # nothing half-written left
