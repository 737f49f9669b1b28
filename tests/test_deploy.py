"""`gisp_deploy.serve(..., refit=)`: the corrected slice exported, served from the export, removed afterwards;
the refusals come before the export's minutes. vLLM itself is replaced by a recorder (tests/serving/ start it)."""

import json

import pytest

import gisp_deploy
from gisp_deploy import deploy
from gisp_deploy.artifact import write_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.serving import launch
from gisp_deploy.serving.process import ServeError
from tests.factory import calibration_windows, free_port, make_model_dir, tiny_config


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    model_dir = make_model_dir(root, "llama-gqa")
    shape = ModelShape.from_config(tiny_config("llama"))
    ranking = prune(None, shape, None, PruneConfig(method="random", max_sparsity=0.6, protect_first=0,
                                                   protect_last=0))
    return write_artifact(root / "art", model_dir, ranking, {"method": "random"}, calibration=calibration_windows())


@pytest.fixture
def served(monkeypatch):
    """What deploy.serve hands to the serving stage: the directory, its config and the options."""
    seen = {}

    def record(path, sparsity, **kw):
        seen.update(path=path, sparsity=sparsity, config=json.loads((path / "config.json").read_text()), **kw)
        return 0

    monkeypatch.setattr(deploy, "serve_slice", record)
    monkeypatch.setattr(launch, "require_vllm", lambda: None)
    return seen


def test_the_python_api_serves_the_corrected_export_and_removes_it(calibrated, served, tmp_path):
    assert gisp_deploy.serve is deploy.serve
    said = []
    rc = gisp_deploy.serve(calibrated, 0.4, refit="ls", port=free_port(), export_dir=tmp_path, log=said.append)
    assert rc == 0 and served["sparsity"] is None  # an export is served as written
    assert served["config"]["gisp_refit"]["name"] == "ls" and served["config"]["gisp_slice"]["sparsity"] == 0.4
    assert served["served_model_name"] == "art@0.4+ls"
    assert served["path"].parent.parent == tmp_path and not served["path"].exists()  # removed once served
    assert any("corrected slice (ls) exported" in s for s in said)


def test_without_a_refit_the_artifact_itself_is_served(calibrated, served):
    gisp_deploy.serve(calibrated, 0.4, port=8123)
    assert served["path"] == calibrated and served["sparsity"] == 0.4 and served["port"] == 8123


@pytest.mark.parametrize("kwargs, said", [
    (dict(sparsity=None), "pass --sparsity ("),
    (dict(sparsity=None, fit_memory="1GiB"), "pass --sparsity instead of a budget"),
    (dict(sparsity=0.4, refit="lsq"), "--refit 'lsq'"),
    (dict(sparsity=0.4, port=0), "--port in 1..65535"),
    (dict(sparsity=0.4, vllm_args=["oops"]), "pass vLLM's own arguments after --"),
])
def test_bad_options_are_refused_before_anything_is_exported(calibrated, served, tmp_path, kwargs, said):
    kwargs = {"refit": "ec", "export_dir": tmp_path, **kwargs}
    with pytest.raises((ServeError, ValueError), match=said.replace("(", r"\(")):
        gisp_deploy.serve(calibrated, **kwargs)
    assert not list(tmp_path.iterdir()) and not served


def test_a_port_in_use_is_refused_before_the_export(calibrated, served, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ServeError, match="cannot listen on"):
            gisp_deploy.serve(calibrated, 0.4, refit="ls", port=s.getsockname()[1], export_dir=tmp_path)
    assert not list(tmp_path.iterdir()) and not served
