"""prune records what load-time corrections need: its calibration windows, listed and digested in the manifest."""

import torch

from gisp_deploy.artifact import STATISTICS, load_artifact
from gisp_deploy.data import load_calibration
from gisp_deploy.pruning.methods import PruneConfig
from gisp_deploy.pruning.run import run_prune
from tests.factory import CALIB_TEXT, make_model_dir


def test_prune_stores_its_calibration_windows(tmp_path):
    from transformers import AutoTokenizer

    model_dir = make_model_dir(tmp_path, "llama-gqa")
    out = tmp_path / "art"
    cfg = PruneConfig(method="oneshot", samples=6, seq_len=16, protect_first=0, protect_last=1, batch_size=2)
    run_prune(str(model_dir), [CALIB_TEXT], out, cfg, log=lambda *a: None)
    art = load_artifact(out)
    assert art.manifest["statistics"]["samples"] == 6 and art.manifest["statistics"]["seq_len"] == 16
    assert art.manifest["files"][STATISTICS] == art.manifest["statistics"]["sha256"]
    ids, mask = art.statistics()
    want = load_calibration("lm", AutoTokenizer.from_pretrained(model_dir), [CALIB_TEXT], 6, 16, 0)
    assert torch.equal(ids, want.input_ids) and bool(mask.all())
    assert (out / STATISTICS).stat().st_size < 6 * 16 * 5 + 1024  # int32 ids + uint8 mask + header


def test_methods_without_calibration_store_none(tmp_path):
    model_dir = make_model_dir(tmp_path, "llama-gqa")
    run_prune(str(model_dir), [], tmp_path / "art", PruneConfig(method="magnitude", protect_first=0),
              log=lambda *a: None)
    art = load_artifact(tmp_path / "art")
    assert "statistics" not in art.manifest and art.statistics() is None
