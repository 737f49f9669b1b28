"""`serve`'s checks before vLLM starts, without vLLM: an open interface without an API key is warned about."""

import pytest

from gisp_deploy.serving import launch


class Stop(Exception):
    pass


@pytest.mark.parametrize("host, key, warned", [("0.0.0.0", None, True), ("0.0.0.0", "k", False),
                                                ("127.0.0.1", None, False), ("10.1.2.3", None, True)])
def test_an_open_interface_without_a_key_is_warned_about(tmp_path, monkeypatch, host, key, warned):
    monkeypatch.setattr(launch, "require_vllm", lambda: None)
    monkeypatch.setattr(launch, "slice_summary", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    if key:
        monkeypatch.setenv("VLLM_API_KEY", key)
    else:
        monkeypatch.delenv("VLLM_API_KEY", raising=False)
    said = []
    with pytest.raises(Stop):
        launch.serve(tmp_path, 0.4, host=host, log=said.append)
    assert any("without an API key" in s and "VLLM_API_KEY" in s for s in said) == warned
    said.clear()
    with pytest.raises(Stop):
        launch.serve(tmp_path, 0.4, host=host, vllm_args=["--api-key", "k"], log=said.append)
    assert not said
