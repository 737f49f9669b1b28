"""`serve`'s checks before vLLM starts, without vLLM: an open interface without an API key is warned about."""

import pytest

from gisp_deploy.serving import launch
from tests.factory import free_port


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


# ---- the banner: a model without a chat template is told about before vLLM starts
def _summary():
    from gisp_deploy.serving.summary import SliceSummary

    return SliceSummary(name="s", sparsity=0.4, achieved_sparsity=0.41, unit="q_head", parameters=2_000_000,
                        dense_parameters=3_000_000, padding_parameters=0, kv_bytes_per_token=512,
                        dense_kv_bytes_per_token=1024, dtype="bfloat16", layers=4, attention_layers=4, mlp_layers=4,
                        query_heads=10, kv_heads=5)


@pytest.mark.parametrize("template", [None, "jinja", "tokenizer_config"])
def test_banner_says_when_chat_completions_will_fail(tmp_path, template):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend"}')
    if template == "jinja":
        (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    elif template == "tokenizer_config":
        (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    has = launch.has_chat_template(tmp_path)
    assert has == (template is not None)
    lines = launch.banner(tmp_path, _summary(), name="s@0.4", base="http://127.0.0.1:8000", chat_template=has)
    text = "\n".join(lines)
    assert "2.00M of 3.00M" in text and "http://127.0.0.1:8000/v1" in text
    hint = [line for line in lines if "chat template" in line]
    if template is None:
        assert len(hint) == 1 and "/v1/chat/completions will answer 400" in hint[0]
        assert "/v1/completions" in hint[0] and "-- --chat-template FILE" in hint[0]
    else:
        assert not hint


def test_serve_prints_the_hint_unless_a_template_is_passed(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "require_vllm", lambda: None)
    monkeypatch.setattr(launch, "slice_summary", lambda *a, **k: _summary())
    monkeypatch.setattr(launch, "staged_model_dir", lambda path: None)
    monkeypatch.setattr(launch, "vllm_command", lambda *a, **k: ["true"])
    monkeypatch.setattr(launch, "run_server", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    for extra, warned in (([], True), (["--chat-template", "t.jinja"], False), (["--chat-template=t.jinja"], False)):
        said = []
        with pytest.raises(Stop):
            launch.serve(tmp_path, 0.4, port=free_port(), vllm_args=extra, log=said.append)
        assert any("no chat template" in s for s in said) == warned, (extra, said)


def test_serve_help_shows_a_chat_template_example():
    from typer.testing import CliRunner

    from gisp_deploy.cli import app

    res = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    text = " ".join(res.output.split()).replace(" \\ ", " ")  # the example's line continuation
    assert res.exit_code == 0 and "serve llama3-gisp --sparsity 0.4 -- --chat-template template.jinja" in text
    assert "without a chat template answers 400 on /v1/chat/completions" in text
