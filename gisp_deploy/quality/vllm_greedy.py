"""vLLM against the compact transformers model: greedy tokens of every checked slice, from one child process.

The child runs the engines one after another (the engine `gisp-deploy serve` uses, with the same plugin models
and hf_overrides), so that a crash, a hang or the engine's memory stays out of the checking process.
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
from pathlib import Path

import torch

from ..serving.launch import vllm_overrides
from ..serving.process import child_env, die_with_parent, staged_model_dir, stop_tree
from ..serving.summary import slice_summary

SERVE_TIMEOUT_S = 1800.0
TIE_ATOL = 1e-3  # top-two logits closer than this: a near-tie, where fp32 kernels may legitimately disagree


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



def _last_error(log: str, limit: int = 600) -> str:
    """The last `SomeError: message` line of a child's log, else its last lines."""
    lines = [re.sub(r"^(\[rank\d+\]:|\(\w+ pid=\d+\))\s*", "", l).strip() for l in log.splitlines()]
    lines = [l for l in lines if l]
    errors = [l for l in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", l)]
    text = errors[-1] if errors else " | ".join(lines[-5:])
    return text[-limit:] or "no output"


def vllm_greedy_tokens(art, sparsities, prompts, new_tokens: int, *, tp_size: int = 1, channel_multiple: int = 1,
                       timeout: float = SERVE_TIMEOUT_S, exports: dict | None = None) -> dict:
    """Greedy tokens of vLLM engines on the slices of `art` at `sparsities` ({s: {"tokens", "engine_s",
    "seconds"}} or {s: {"error"}}), from one child process that runs the engines one after another.
    `exports` ({s: directory}): serve these exported slices instead (a corrected slice's export)."""
    if not sparsities:
        return {}
    max_len = len(prompts[0]) + new_tokens
    kv = slice_summary(art.path, sparsities[0], tp_size=tp_size, channel_multiple=channel_multiple,
                       dtype="float32").dense_kv_bytes_per_token
    staged = staged_model_dir(Path(art.path))  # --no-copy-weights: vLLM reads the weights from its model directory
    with tempfile.TemporaryDirectory(prefix="gisp-check-vllm-") as tmp:
        spec = {"model": str(Path(staged.name) if staged else art.path), "artifact": str(Path(art.path).resolve()),
                "sparsities": list(sparsities), "tp_size": tp_size, "channel_multiple": channel_multiple,
                "exports": None if exports is None else [str(exports[s]) for s in sparsities],
                "prompts": prompts, "new_tokens": new_tokens,
                "engine": {"dtype": "float32", "enforce_eager": True, "seed": 0, "max_model_len": max_len,
                           "tensor_parallel_size": tp_size, "skip_tokenizer_init": True,
                           "kv_cache_memory_bytes": max(64 << 20, 8 * max_len * kv * len(prompts))}}
        spec_path, out_path, log_path = Path(tmp) / "spec.json", Path(tmp) / "out.json", Path(tmp) / "vllm.log"
        spec_path.write_text(json.dumps(spec))
        env = child_env(tp_size)
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in the child itself: starts in seconds
        cmd = [sys.executable, "-c", "from gisp_deploy.quality.vllm_greedy import vllm_child; vllm_child()", str(spec_path),
               str(out_path)]
        t = time.perf_counter()
        try:
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=die_with_parent)
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


    results = {}
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0, ignore_eos=True, detokenize=False)
    for i, s in enumerate(spec["sparsities"]):
        t = time.perf_counter()
        llm = None
        try:
            if spec.get("exports"):  # an exported slice carries its widths in its config
                llm = LLM(spec["exports"][i], **spec["engine"])
            else:
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
