"""`gisp-deploy serve` under hostile or careless clients: oversized requests, clients that hang up mid-stream, and a
stop with Ctrl-C. A real vLLM engine on the CPU behind real HTTP on 127.0.0.1; one server for the module (the
fixtures of tests/serving/conftest.py). Every request has a timeout; skipped only where vLLM is not installed."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from gisp_deploy.serving.launch import check_port
from gisp_deploy.slicing.loader import load
from tests.factory import PROMPTS, hf_greedy, http_status, needs_vllm, running

pytestmark = [needs_vllm, pytest.mark.slow]
MODEL = "llama-gqa-q_head@0.4"  # test_vllm's server: the 0.4 slice, --max-model-len 256
MAX_LEN = 256


def post(url: str, body, timeout=60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def metrics(server) -> dict:
    with urllib.request.urlopen(f"{server.base}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for name, value in re.findall(r"^(vllm:[a-z_]+)\{[^}]*\} (\S+)$", text, re.M):
        out[name] = out.get(name, 0.0) + float(value)  # summed over labels (engine, finished_reason, ...)
    return out


def assert_serves_correctly(server, artifacts):
    assert http_status(f"{server.base}/health") == 200
    model = load(artifacts("llama-gqa"), 0.4)
    for prompt in PROMPTS[:2]:
        code, r = post(f"{server.base}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8,
                                                         "temperature": 0, "ignore_eos": True,
                                                         "return_token_ids": True})
        assert code == 200, r
        assert r["choices"][0]["token_ids"] == hf_greedy(model, prompt, 8)[0]


def test_oversized_requests_get_4xx_with_a_message(server, artifacts):
    cases = {
        "text prompt beyond --max-model-len": ({"prompt": "hello " * 2000, "max_tokens": 4},
                                               f"maximum context length is {MAX_LEN}"),
        "max_tokens far beyond it": ({"prompt": "hello", "max_tokens": 10**9}, "max_tokens"),
        "max_tokens beyond 64 bits": ({"prompt": "hello", "max_tokens": 2**70}, "max_tokens"),
        "an 8 MB prompt": ({"prompt": "x" * (8 << 20), "max_tokens": 4}, "maximum context length"),
        "a 2M-token prompt (10 MB of JSON)": ({"prompt": [5] * (2 << 20), "max_tokens": 4}, "maximum context length"),
        "100k choices": ({"prompt": "hello", "max_tokens": 1, "n": 100_000}, "n must be at most"),
    }
    for what, (body, message) in cases.items():
        t = time.monotonic()
        code, r = post(f"{server.base}/v1/completions", {"model": MODEL, **body})
        assert 400 <= code < 500, (what, code, r)
        assert message in r["error"]["message"], (what, r)
        assert time.monotonic() - t < 30, what
    code, r = post(f"{server.base}/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi " * 100_000}]})
    assert 400 <= code < 500 and "maximum context length" in r["error"]["message"], (code, r)
    assert_serves_correctly(server, artifacts)


def _hang_up_after_first_chunk(server, prompt, max_tokens) -> bytes:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while b"data:" not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
    return got


def test_clients_that_disconnect_mid_stream(server, artifacts):
    """Six streams dropped after their first chunk (three in turn, three at once): the engine aborts them (how
    many tokens it makes before it notices depends on the machine's speed), frees them, and answers the next
    requests correctly."""
    prompt, max_tokens = [5, 6, 7], MAX_LEN - 16
    before = metrics(server)
    for _ in range(3):
        assert b"200 OK" in _hang_up_after_first_chunk(server, prompt, max_tokens)
    with ThreadPoolExecutor(3) as pool:
        assert all(b"200 OK" in g for g in pool.map(lambda _: _hang_up_after_first_chunk(server, prompt, max_tokens),
                                                     range(3)))
    deadline = time.monotonic() + 30
    while metrics(server).get("vllm:num_requests_running", 1) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    after = metrics(server)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    # an aborted request is not a finished one: fewer than the six ran to their max_tokens
    finished = after["vllm:request_success_total"] - before["vllm:request_success_total"]
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert finished < 6 and generated < 6 * max_tokens, (finished, generated)
    assert_serves_correctly(server, artifacts)


def test_ctrl_c_leaves_no_process_and_frees_the_port(server):
    rc, kids = server.stop(signal.SIGINT)
    assert rc == 0 and "stopped" in server.output()
    assert kids and not [k for k in kids if running(k)]
    assert http_status(f"{server.base}/health", timeout=2) == -1
    check_port("127.0.0.1", server.port)  # a new server can listen there at once (else ServeError)
