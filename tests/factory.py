"""Shared test helpers: tiny random-weight models of every family saved as users' files would be, the oracle,
hand-made slice plans, and a `gisp-deploy serve` process on loopback. Test modules import from here only."""

from __future__ import annotations

import copy
import json
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from gisp_deploy.artifact import load_artifact, write_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.plan import LayerPlan, SlicePlan, plan_slice
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.slicing.oracle import apply_oracle

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MODEL = ROOT / "examples" / "tiny-llama-gqa-19m"
EXAMPLE_TRAIN = ROOT / "examples" / "data" / "train"
EXAMPLE_HELDOUT = ROOT / "examples" / "data" / "heldout" / "persuasion.txt.gz"
CALIB_TEXT = EXAMPLE_TRAIN / "austen_northangerabbey.txt.gz"

# name -> (model_type, overrides); every family in MHA and GQA form
FAMILIES = {
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-gqa": ("llama", {}),
    "mistral-gqa": ("mistral", {}),
    "qwen2-gqa": ("qwen2", {}),
    "qwen2-mha": ("qwen2", {"num_key_value_heads": 4}),
    "qwen3-gqa": ("qwen3", {}),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=8192, max_position_embeddings=256,
              bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def make_model_dir(root: Path, name: str, seed: int = 0, **overrides) -> Path:
    """Write a random-weight model of family `name` (see FAMILIES) with the example tokenizer."""
    from transformers import AutoModelForCausalLM

    model_type, base = FAMILIES[name]
    cfg = tiny_config(model_type, **{**base, **overrides})
    cfg.architectures = [type(AutoModelForCausalLM.from_config(cfg)).__name__]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so scores differ clearly
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif n.endswith(".bias"):
                p.normal_(0, 0.1)
    out = Path(root) / name
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EXAMPLE_MODEL / f, out / f)
    return out


# ---- the oracle and hand-made plans (slicing, export, serving tests)
ATOL = 1e-5


def dense_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class Source:
    """A tiny model, its artifact (random ranking, every layer prunable) and the dense model for the oracle."""

    def __init__(self, model_dir, dense, root, unit, calibration=None):
        self.dense, self.shape = dense, ModelShape.from_config(dense.config)
        cfg = PruneConfig(method="random", unit=unit, max_sparsity=0.7, protect_first=0, protect_last=0)
        ranking = prune(dense, self.shape, None, cfg)
        name = f"art-{unit}" + ("-calibrated" if calibration is not None else "")
        self.artifact = load_artifact(write_artifact(root / name, model_dir, ranking, {"method": "random"},
                                                     calibration=calibration))

    def oracle(self, plan):
        model = copy.deepcopy(self.dense)
        apply_oracle(model, plan)
        return model


def calibration_windows(samples=24, length=12, seed=1, padded_row=3):
    """Calibration windows as prune records them (a data.Calibration); one row right-padded."""
    from gisp_deploy.data import Calibration

    ids = torch.randint(3, 8000, (samples, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded_row is not None:
        mask[padded_row, length * 2 // 3:] = 0
    return Calibration(ids, mask, mask, torch.full((samples,), 1.0 / samples, dtype=torch.float64), "lm", ())


def probe_ids(batch=2, length=10, seed=0):
    return torch.randint(3, 8000, (batch, length), generator=torch.Generator().manual_seed(seed))


def decoder_linear_params(model) -> int:
    return sum(p.numel() for n, p in model.model.layers.named_parameters() if "_proj." in n)


def assert_matches(compact, oracle, ids, attention_mask=None, atol=ATOL, generate=True, want=None):
    """Logits equal to `atol` (positions under the mask only); greedy generate gives the same tokens.
    `want` caches the oracle's (logits, tokens) between calls; returned for reuse."""
    with torch.no_grad():
        got = compact(ids, attention_mask=attention_mask).logits
        if want is None:
            want = (oracle(ids, attention_mask=attention_mask).logits, None)
    sel = attention_mask.bool() if attention_mask is not None else slice(None)  # padded positions are not compared
    torch.testing.assert_close(got[sel], want[0][sel], atol=atol, rtol=0)
    if generate:
        kw = dict(max_new_tokens=8, do_sample=False, attention_mask=attention_mask)
        if want[1] is None:
            want = (want[0], oracle.generate(ids, **kw))
        assert torch.equal(compact.generate(ids, **kw), want[1])
    return want


def hand_plan(shape, layers, unit="q_head") -> SlicePlan:
    g = shape.group_size
    lps = tuple(LayerPlan(q_heads=tuple(q), kv_heads=tuple(sorted({h // g for h in q})),
                          channels=tuple(range(shape.intermediate)) if c is None else tuple(c)) for q, c in layers)
    probe = SlicePlan(shape=shape, unit=unit, sparsity=0.0, achieved_sparsity=0.0, prefix=0, layers=lps)
    achieved = 1 - probe.kept_params / shape.total_params
    return SlicePlan(shape=shape, unit=unit, sparsity=achieved, achieved_sparsity=achieved, prefix=0, layers=lps)


def extreme_plans(shape):
    h, n = shape.num_heads, shape.intermediate
    uneven = list(range(h - 1))  # 3 of 4 heads: with group size 2, groups of 2 and 1
    return {
        # layer 0 has neither attention nor MLP; uneven groups; a single head; untouched last layer
        "mixed": [([], []), (uneven, []), ([h - 1], list(range(0, n, 3))), (list(range(h)), None)],
        "nothing_left": [([], [])] * shape.num_layers,
        "attention_only_in_last": [([], None)] * (shape.num_layers - 1) + [([1], [])],
    }


# ---- vLLM: engines and `gisp-deploy serve` (tests/serving, tests/quality)
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]')")

# head_dim 32: the CPU attention backend has no kernels for 16
VLLM_SHAPE = dict(hidden_size=128, head_dim=32, intermediate_size=256)  # 4 query heads; 2 KV heads (GQA) or 4 (MHA)
VLLM_MODELS = {  # name -> (factory family, overrides)
    "llama-gqa": ("llama-gqa", {}),
    "llama-mha": ("llama-mha", {}),
    "mistral-gqa": ("mistral-gqa", {}),
    "qwen2-gqa": ("qwen2-gqa", {}),
    "qwen3-gqa": ("qwen3-gqa", {}),
    "llama-bias": ("llama-gqa", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
}
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = [[5, 17, 300, 42, 9, 1000], [7, 8, 9, 10], [(37 * i) % 7900 + 3 for i in range(37)]]
NEW_TOKENS = 10
ENGINE = dict(dtype="float32", kv_cache_memory_bytes=32 << 20, max_model_len=128, enforce_eager=True, seed=0)


def hf_greedy(model, prompt, n=NEW_TOKENS):
    """Greedy tokens (and their log-probabilities) of a transformers model, recomputing the whole sequence."""
    ids = list(prompt)
    logprobs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: OpenMP barriers cost 40x more than the work on a busy 2-CPU machine
    try:
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([ids])).logits[0, -1].double()
                tok = int(logits.argmax())
                logprobs.append(float(torch.log_softmax(logits, -1)[tok]))
                ids.append(tok)
    finally:
        torch.set_num_threads(threads)
    return ids[len(prompt):], logprobs


SERVE_ARGV = [sys.executable, "-m", "gisp_deploy.cli", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE_VLLM_ARGS = ("--enforce-eager", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20),
                   "--dtype", "float32")


class Server:
    """`gisp-deploy serve` in a child process on 127.0.0.1 (a free port), its output in `log`; vLLM gets
    `vllm_args` (small and fast by default), then `extra_vllm`."""

    def __init__(self, path, args, log: Path, *extra_vllm, vllm_args=SERVE_VLLM_ARGS):
        self.port = free_port()
        self.log = log
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        argv = [*SERVE_ARGV, str(path), *args, "--port", str(self.port), "--", *vllm_args, *extra_vllm]
        self.proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.base = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            if "\nserving '" in self.output() and http_status(f"{self.base}/health") == 200:  # serve's line, not vLLM's
                return
            time.sleep(0.5)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()[-4000:]}")

    def descendants(self):
        import psutil

        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, sig, timeout=90):
        kids = self.descendants()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(running(k) for k in kids):
            time.sleep(0.2)
        return rc, kids


def running(p) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:
        return False


def http_status(url, data: bytes | None = None, timeout=30) -> int:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return -1


def speed_results(path: Path, art, points, batch_size: int = 1, perplexity=None, tp_size: int = 1,
                  channel_multiple: int = 1) -> Path:
    """A results.json as `gisp-deploy bench --speed` writes it, with `points` {sparsity: speed-up} measured at
    `batch_size` (dense included) and `perplexity` {sparsity: ppl} of persuasion.txt.gz at 128 tokens."""
    records = []
    for s in sorted({0.0, *points}):
        plan = plan_slice(art.ranking, s, tp_size=tp_size, channel_multiple=channel_multiple)
        ident = {"artifact": str(art.path), "name": Path(art.path).name, "method": "gisp", "unit": plan.unit,
                 "sparsity": s, "achieved_sparsity": round(plan.achieved_sparsity, 6)}
        records.append({**ident, "measure": "size", "decoder_params": plan.kept_params,
                        "dense_decoder_params": plan.shape.total_params})
        if s in (perplexity or {}):
            records.append({**ident, "measure": "perplexity", "text": "persuasion.txt.gz", "seq_len": 128,
                            "perplexity": perplexity[s]})
        up = points.get(s, 1.0)
        records.append({**ident, "measure": "speed", "prompt_len": 16, "gen_len": 32, "batch_size": batch_size,
                        "speedup": up, "speedup_min": up * 0.98, "speedup_max": up * 1.02, "warnings": []})
    path.write_text(json.dumps({"command": "bench", "speed": {"tp_size": tp_size, "channel_multiple":
                                                               channel_multiple}, "results": records}))
    return path


def run_cli(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`gisp-deploy ARGS...` in a child process, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "gisp_deploy.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


# ---- per-sequence gradients, independently of the scoring pass (second-order score tests)
def per_sequence_grads(model, weights: dict, calib) -> list[dict]:
    """∇ mean-NLL of each calibration sequence alone (its own forward and backward, loss-masked tokens, its
    padding cut off), for each weight in `weights`; without the sequence weight w_i."""
    import torch.nn.functional as F

    out = []
    for ids, att, lmask in zip(calib.input_ids, calib.attention_mask, calib.loss_mask):
        n = int(att.sum())
        x, targets = ids[:n].unsqueeze(0), ids[1:n]
        logp = F.log_softmax(model(input_ids=x).logits.float(), -1)[0, :-1]  # [T-1, V]
        mask = lmask[1:n].float()  # [T-1]
        nll = -(logp.gather(1, targets.unsqueeze(1))[:, 0] * mask).sum() / mask.sum()
        grads = torch.autograd.grad(nll, list(weights.values()))
        out.append({k: g.float() for k, g in zip(weights, grads)})
    return out
