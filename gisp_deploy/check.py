"""`gisp-deploy check`: guard every deployed size of an artifact in CI (integrity, nesting, exactness, quality).

With `serve=True` each slice is also run by vLLM (the engine `gisp-deploy serve` uses, with the same plugin
models and hf_overrides), in one child process for all slices so that a crash, a hang or the engine's memory
stays out of this process; its greedy tokens on probe prompts must equal the compact transformers model's.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .artifact import load_artifact
from .data import token_stream
from .evaluate import OracleSlicer, perplexity
from .loader import load
from .plan import plan_slice
from .tasks import task_accuracy


@dataclass
class CheckResult:
    name: str
    ok: bool
    message: str
    seconds: float = 0.0


class Checker:
    """Runs named checks, records each outcome, and keeps going after a failure."""

    def __init__(self, progress=None):
        self.results: list[CheckResult] = []
        self.progress = progress

    def run(self, name: str, fn) -> object:
        t = time.perf_counter()
        try:
            value, message = fn()
            self.results.append(CheckResult(name, True, message, time.perf_counter() - t))
            return value
        except Exception as e:  # a failed check is a result, not a crash
            self.results.append(CheckResult(name, False, f"{type(e).__name__}: {e}", time.perf_counter() - t))
            return None
        finally:
            if self.progress:
                self.progress(self.results[-1])

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


SERVE_PROMPT_TOKENS = 24  # the first tokens of each probe row are vLLM's prompts
SERVE_NEW_TOKENS = 16
SERVE_TIMEOUT_S = 1800.0
TIE_ATOL = 1e-3  # top-two logits closer than this: a near-tie, where fp32 kernels may legitimately disagree


def _probe_ids(tokenizer, text, vocab: int, batch: int = 2, length: int = 64) -> torch.Tensor:
    if text and tokenizer is not None:
        stream = token_stream(tokenizer, [text])[: batch * length]
        if len(stream) == batch * length:
            return stream.view(batch, length)
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def check_artifact(path, sparsities, *, text=None, seq_len: int = 128, max_tokens: int = 16384,
                   max_ppl_ratio: float | None = None, task=None, min_accuracy: float | None = None,
                   tp_size: int = 1, channel_multiple: int = 1, atol: float = 1e-3, serve: bool = False,
                   serve_timeout: float = SERVE_TIMEOUT_S, progress=None) -> Checker:
    """Every check of one artifact at `sparsities`; see Checker.results. `serve`: also compare vLLM's greedy
    tokens with the compact model's on every slice (needs vLLM; see `vllm_greedy_tokens`)."""
    from .prune_run import load_model, load_tokenizer

    c = Checker(progress)
    art = c.run("artifact: manifest and ranking sha256", lambda: (load_artifact(path), "readable, ranking intact"))
    if art is None:
        return c
    c.run("artifact: weight files sha256", lambda: (art.verify_weights(), f"{len(art.manifest['weights']['sha256'])} "
                                                                          "files match the manifest"))
    plans = {}
    for s in sorted(sparsities):
        plans[s] = c.run(f"s={s:g}: slice plan", lambda s=s: _plan(art, s, tp_size, channel_multiple))

    def nested():
        ordered = [p for _, p in sorted(plans.items()) if p is not None]
        for small, big in zip(ordered, ordered[1:]):
            for i, (a, b) in enumerate(zip(small.layers, big.layers)):
                for field in ("q_heads", "kv_heads", "channels"):
                    if not set(getattr(b, field)) <= set(getattr(a, field)):
                        raise AssertionError(f"layer {i}: {field} at s={big.sparsity:g} not within s={small.sparsity:g}")
        return None, f"{len(ordered)} slices nested"
    c.run("slices nested", nested)

    tok = c.run("artifact: tokenizer", lambda: _tokenizer(load_tokenizer, art.path))
    ids = _probe_ids(tok, text, art.config.vocab_size)
    prompts = ids[:, :SERVE_PROMPT_TOKENS].tolist()
    served = {}
    if serve:  # before the dense model is loaded here: the engine's memory and ours never add up
        todo = [s for s, p in sorted(plans.items()) if p is not None]
        try:
            served = vllm_greedy_tokens(art, todo, prompts, SERVE_NEW_TOKENS, tp_size=tp_size,
                                        channel_multiple=channel_multiple, timeout=serve_timeout)
        except Exception as e:  # noqa: BLE001 - each slice's vLLM check fails with it; the other checks still run
            served = {s: {"error": f"{type(e).__name__}: {e}"} for s in todo}
    dense = load_model(art.weights_dir, torch.device("cpu"), torch.float32)
    oracle = OracleSlicer(dense)
    stream = token_stream(tok, [text])[:max_tokens] if text and tok is not None else None
    base_ppl = None
    if stream is not None and max_ppl_ratio is not None:
        base_ppl = c.run("dense: perplexity", lambda: _ppl(dense, stream, seq_len))
    for s, plan in sorted(plans.items()):
        if plan is None:
            continue
        model = c.run(f"s={s:g}: loads", lambda plan=plan: _load(art, plan))
        if model is None:
            continue
        c.run(f"s={s:g}: matches the oracle", lambda model=model, plan=plan: _exact(model, oracle.apply(plan), ids, atol))
        if stream is not None and max_ppl_ratio is not None and base_ppl is not None:
            c.run(f"s={s:g}: perplexity within {max_ppl_ratio:g}x dense",
                  lambda model=model: _ppl_ratio(model, stream, seq_len, base_ppl, max_ppl_ratio))
        if task is not None and min_accuracy is not None and tok is not None:
            c.run(f"s={s:g}: accuracy >= {min_accuracy:g}", lambda model=model: _accuracy(model, tok, task, min_accuracy))
        if serve:
            c.run(f"s={s:g}: vLLM greedy tokens equal the compact model's",
                  lambda model=model, s=s: _same_as_vllm(model, prompts, served.get(s)))
            c.results[-1].seconds += served.get(s, {}).get("seconds", 0.0)
        del model
    return c


def _tokenizer(load_tokenizer, path):
    tok = load_tokenizer(path)
    return tok, f"{type(tok).__name__}, {len(tok):,} tokens"


def _plan(art, s, tp_size, channel_multiple):
    plan = plan_slice(art.ranking, s, tp_size=tp_size, channel_multiple=channel_multiple)
    return plan, f"achieved sparsity {plan.achieved_sparsity:.4f}, {plan.kept_params:,} decoder parameters kept"


def _load(art, plan):
    t = time.perf_counter()
    model = load(art, plan=plan)
    return model, f"compact model in {time.perf_counter() - t:.2f} s"


@torch.no_grad()
def _exact(model, oracle, ids, atol):
    got, want = model(ids).logits, oracle(ids).logits
    diff = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    if diff > atol * scale:
        raise AssertionError(f"max |logit difference| {diff:.3g} exceeds {atol:g} x {scale:.3g}")
    same = torch.equal(got.argmax(-1), want.argmax(-1))
    if not same:
        raise AssertionError("greedy next tokens differ from the oracle's")
    return None, f"max |logit difference| {diff:.2e} on a {tuple(ids.shape)} probe; greedy tokens identical"


def _ppl(model, stream, seq_len):
    ppl, n = perplexity(model, stream, seq_len)
    return ppl, f"{ppl:.2f} over {n} tokens"


def _ppl_ratio(model, stream, seq_len, base, limit):
    ppl, _ = perplexity(model, stream, seq_len)
    if ppl > limit * base:
        raise AssertionError(f"perplexity {ppl:.2f} is {ppl / base:.2f}x the dense {base:.2f} (limit {limit:g}x)")
    return ppl, f"{ppl:.2f} = {ppl / base:.2f}x dense"


def _accuracy(model, tok, task, minimum):
    acc = task_accuracy(model, tok, task)
    if acc["accuracy"] < minimum:
        raise AssertionError(f"accuracy {acc['accuracy']:.3f} on {acc['items']} items is below {minimum:g}")
    return acc, f"{acc['accuracy']:.3f} on {acc['items']} items"


# ---- vLLM against the compact model
@torch.no_grad()
def greedy_reference(model, prompts: list[list[int]], new_tokens: int):
    """Greedy continuation of equal-length `prompts` by a transformers model, recomputing the whole sequence at
    every step (no KV cache involved); returns (tokens, top-two logit gap at each step) per prompt."""
    ids = torch.tensor(prompts, dtype=torch.long)
    gaps = []
    for _ in range(new_tokens):
        top = model(ids).logits[:, -1].double().topk(2, dim=-1)
        gaps.append(top.values[:, 0] - top.values[:, 1])
        ids = torch.cat([ids, top.indices[:, :1]], dim=1)
    return ids[:, len(prompts[0]):].tolist(), torch.stack(gaps, dim=1).tolist()


def compare_greedy(got: list[list[int]], want: list[list[int]], gaps: list[list[float]],
                   tie_atol: float = TIE_ATOL) -> str:
    """vLLM's tokens `got` against the reference `want` (with its top-two gaps); raises AssertionError naming
    the first divergence that is not a near-tie; returns a one-line description of the agreement."""
    ties = []
    for p, (g, w, gap) in enumerate(zip(got, want, gaps)):
        for i, (a, b) in enumerate(zip(g, w)):
            if a != b:
                if gap[i] < tie_atol:
                    ties.append(f"prompt {p} token {i}")
                    break
                raise AssertionError(
                    f"prompt {p}: vLLM's token {i} is {a} where the compact model's is {b} (its top-two logit gap "
                    f"{gap[i]:.3g}, not a tie); vLLM {g[:i + 1]} vs transformers {w[:i + 1]}")
        else:
            if len(g) != len(w):
                raise AssertionError(f"prompt {p}: vLLM returned {len(g)} tokens, expected {len(w)}")
    if len(got) != len(want):
        raise AssertionError(f"vLLM answered {len(got)} of {len(want)} prompts")
    note = f"; near-ties (top-two gap < {tie_atol:g}) end the comparison at {', '.join(ties)}" if ties else ""
    return f"{len(want)} prompts x {len(want[0])} new tokens identical{note}"


def _same_as_vllm(model, prompts, served):
    if served is None:
        raise AssertionError("vLLM returned nothing for this slice")
    if "error" in served:
        raise AssertionError(f"vLLM could not run this slice: {served['error']}")
    want, gaps = greedy_reference(model, prompts, len(served["tokens"][0]))
    message = compare_greedy(served["tokens"], want, gaps)
    return None, f"{message} (vLLM engine up in {served['engine_s']:.1f} s)"


def _last_error(log: str, limit: int = 600) -> str:
    """The last `SomeError: message` line of a child's log, else its last lines."""
    lines = [re.sub(r"^(\[rank\d+\]:|\(\w+ pid=\d+\))\s*", "", l).strip() for l in log.splitlines()]
    lines = [l for l in lines if l]
    errors = [l for l in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", l)]
    text = errors[-1] if errors else " | ".join(lines[-5:])
    return text[-limit:] or "no output"


def vllm_greedy_tokens(art, sparsities, prompts, new_tokens: int, *, tp_size: int = 1, channel_multiple: int = 1,
                       timeout: float = SERVE_TIMEOUT_S) -> dict:
    """Greedy tokens of vLLM engines on the slices of `art` at `sparsities` ({s: {"tokens", "engine_s",
    "seconds"}} or {s: {"error"}}), from one child process that runs the engines one after another."""
    from .serve import _die_with_parent, child_env, slice_summary, staged_model_dir, stop_tree

    if not sparsities:
        return {}
    max_len = len(prompts[0]) + new_tokens
    kv = slice_summary(art.path, sparsities[0], tp_size=tp_size, channel_multiple=channel_multiple,
                       dtype="float32").dense_kv_bytes_per_token
    staged = staged_model_dir(Path(art.path))  # --no-copy-weights: vLLM reads the weights from its model directory
    with tempfile.TemporaryDirectory(prefix="gisp-check-vllm-") as tmp:
        spec = {"model": str(Path(staged.name) if staged else art.path), "artifact": str(Path(art.path).resolve()),
                "sparsities": list(sparsities), "tp_size": tp_size, "channel_multiple": channel_multiple,
                "prompts": prompts, "new_tokens": new_tokens,
                "engine": {"dtype": "float32", "enforce_eager": True, "seed": 0, "max_model_len": max_len,
                           "tensor_parallel_size": tp_size, "skip_tokenizer_init": True,
                           "kv_cache_memory_bytes": max(64 << 20, 8 * max_len * kv * len(prompts))}}
        spec_path, out_path, log_path = Path(tmp) / "spec.json", Path(tmp) / "out.json", Path(tmp) / "vllm.log"
        spec_path.write_text(json.dumps(spec))
        env = child_env(tp_size)
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in the child itself: starts in seconds
        cmd = [sys.executable, "-c", "from gisp_deploy.check import vllm_child; vllm_child()", str(spec_path),
               str(out_path)]
        t = time.perf_counter()
        try:
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_die_with_parent)
                try:
                    proc.wait(timeout)
                    failure = None if proc.returncode == 0 else f"the vLLM child exited with status {proc.returncode}"
                except subprocess.TimeoutExpired:
                    failure = f"vLLM did not finish within {timeout:g} s"
                finally:
                    stop_tree(proc, grace=5.0)
        finally:
            if staged:
                staged.cleanup()
        results = {float(k): v for k, v in json.loads(out_path.read_text()).items()} if out_path.is_file() else {}
        if failure:
            detail = f"{failure}: {_last_error(log_path.read_text(errors='replace'))}"
            for s in sparsities:
                results.setdefault(s, {"error": detail})
        overhead = time.perf_counter() - t - sum(r.get("seconds", 0.0) for r in results.values())
        first = results.setdefault(sparsities[0], {"error": "the vLLM child returned nothing for this slice"})
        first["seconds"] = first.get("seconds", 0.0) + max(0.0, overhead)  # vLLM's import and start-up
    return results


def vllm_child() -> None:
    """The child of `vllm_greedy_tokens`: argv = spec.json out.json. Writes out.json after every slice."""
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    from .serve import vllm_overrides

    results = {}
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0, ignore_eos=True, detokenize=False)
    for s in spec["sparsities"]:
        t = time.perf_counter()
        llm = None
        try:
            overrides = vllm_overrides(spec["artifact"], s, tp_size=spec["tp_size"],
                                       channel_multiple=spec["channel_multiple"])
            llm = LLM(spec["model"], hf_overrides=overrides, **spec["engine"])
            engine_s = time.perf_counter() - t
            outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
            results[s] = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "engine_s": engine_s,
                          "seconds": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001 - reported as this slice's failure; the next slice still runs
            results[s] = {"error": f"{type(e).__name__}: {str(e)[:500]}", "seconds": time.perf_counter() - t}
        finally:
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        os.replace(tmp, out_path)


def write_junit(checker: Checker, path: Path, suite: str) -> None:
    failures = sum(not r.ok for r in checker.results)
    root = ET.Element("testsuite", name=suite, tests=str(len(checker.results)), failures=str(failures),
                      errors="0", time=f"{sum(r.seconds for r in checker.results):.3f}")
    for r in checker.results:
        case = ET.SubElement(root, "testcase", classname=suite, name=r.name, time=f"{r.seconds:.3f}")
        if r.ok:
            ET.SubElement(case, "system-out").text = r.message
        else:
            ET.SubElement(case, "failure", message=r.message).text = r.message
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def write_json(checker: Checker, path: Path, artifact: str) -> None:
    Path(path).write_text(json.dumps({"artifact": artifact, "ok": checker.ok,
                                      "results": [asdict(r) for r in checker.results]}, indent=2) + "\n")
