"""The vLLM server options a plan implies, and how they meet the ones a user passes after `--`.

With a memory budget (`serve --fit-memory`), vLLM must get what `budget.fit` planned: the context and the
concurrency the KV cache was sized for, the dtype the weights were counted in, and exactly the memory of the
budget — on a GPU as `--gpu-memory-utilization` (the budget over the device's total memory: vLLM keeps weights,
activations and KV cache inside that share), on the CPU as `--kv-cache-memory-bytes` (vLLM-CPU sizes its KV
cache by that alone, so it gets the planned KV bytes, rounded up to whole blocks). An option the user also
passes after `--` must say the same, or it is refused in one line.

Nothing here imports vLLM, and the GPU's memory is read in a child process: a CUDA context in `serve` would hold
memory that vLLM, started next, could then not have.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, fields

from ..arguments import DTYPE_NAMES
from ..budget import format_bytes
from .process import ServeError

CPU_BLOCK_SIZE = 128  # vLLM-CPU's default --block-size for ordinary attention (vllm/platforms/cpu.py)
GiB = 2**30


# ---- reading vLLM's command line
def flag_value(args: list[str], flag: str) -> str | None:
    """The value of `flag` in `args` (`--flag V` or `--flag=V`; the last one wins, as in argparse)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def has_flag(args: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def vllm_int(text: str) -> int:
    """An integer as vLLM's argument parser reads it (vllm.utils.argparse_utils.human_readable_int): 4096, 8k
    (decimal: 8000), 8K (binary: 8192), 1.5g."""
    text = str(text).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", text)
    if not match:
        return int(text)
    number, suffix = match.groups()
    if suffix.islower():
        return int(float(number) * 10 ** (3 * "kmgt".index(suffix) + 3))
    return int(number) * 2 ** (10 * "KMGT".index(suffix) + 10)


@dataclass(frozen=True)
class VllmSettings:
    """The options `serve` passes to vLLM's server for a slice (None: not set, vLLM's default)."""

    max_model_len: int | None = None
    max_num_seqs: int | None = None
    dtype: str | None = None
    kv_cache_dtype: str | None = None
    gpu_memory_utilization: float | None = None  # GPU: the share of each device that is the budget
    kv_cache_memory_bytes: int | None = None  # CPU: each rank's KV cache

    def args(self) -> list[str]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out += [f"--{f.name.replace('_', '-')}", repr(value) if isinstance(value, float) else str(value)]
        return out


def _same(flag: str, given: str, planned) -> bool:
    try:
        if isinstance(planned, float):
            return math.isclose(float(given), planned, rel_tol=1e-9)
        if isinstance(planned, int):
            return vllm_int(given) == planned
    except ValueError:
        return False
    if flag == "--dtype":
        return DTYPE_NAMES.get(given.lower(), given.lower()) == planned
    return given.lower() == str(planned).lower()


def merged_args(extra: list[str], settings: VllmSettings) -> list[str]:
    """vLLM's arguments: the settings the user did not pass after `--`, then the user's own. A user value that
    differs from a planned one is an error (vLLM would take the last one and break the plan)."""
    planned = settings.args()
    missing = []
    for flag, value in zip(planned[::2], planned[1::2]):
        given = flag_value(extra, flag)
        if given is None:
            missing += [flag, value]
        elif not _same(flag, given, getattr(settings, flag[2:].replace("-", "_"))):
            raise ServeError(f"{flag} {given} after -- contradicts the plan ({flag} {value}): drop it after --, "
                             "or change the budget's own option (serve --help)")
    return missing + list(extra)


# ---- what a memory budget gives vLLM
def cpu_kv_cache_bytes(kv_bytes_per_token: int, max_model_len: int, max_num_seqs: int,
                       block_size: int = CPU_BLOCK_SIZE) -> int:
    """KV-cache bytes one rank needs so that vLLM holds `max_num_seqs` sequences of `max_model_len` tokens at
    once: vLLM cuts its cache into blocks of `block_size` tokens (a page of each layer's own KV heads per block),
    a sequence takes whole blocks, and one block is vLLM's null block, never given to a sequence."""
    blocks = max_num_seqs * -(-max_model_len // block_size) + 1
    return blocks * block_size * kv_bytes_per_token


def gpu_memory_utilization(budget: int, devices: list[tuple[int, int]]) -> float:
    """vLLM's --gpu-memory-utilization that gives it `budget` bytes of each GPU (`devices`: free and total bytes
    of each one it uses): budget / total memory. One share holds for every rank, so devices of different sizes
    get the smallest one's budget-sized share: never less than the budget on any of them."""
    smallest = min(total for _, total in devices)
    if budget > smallest:
        raise ServeError(f"--fit-memory {format_bytes(budget)} is more than the GPU has ({format_bytes(smallest)}): "
                         "lower --fit-memory")
    share = budget / smallest
    for i, (free, total) in enumerate(devices):
        if share * total > free:  # vLLM refuses to start when its share is not free
            raise ServeError(f"--fit-memory {format_bytes(budget)}: cuda:{i} has only {format_bytes(free)} of "
                             f"{format_bytes(total)} free (other processes hold the rest): lower --fit-memory or "
                             "free the GPU")
    return share


def cuda_memory(count: int) -> list[tuple[int, int]]:
    """(free, total) bytes of the first `count` CUDA devices (torch.cuda.mem_get_info in a child process)."""
    code = ("import json, torch; n = torch.cuda.device_count(); "
            f"print(json.dumps([torch.cuda.mem_get_info(i) for i in range(min(n, {count}))]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    found = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else []
    if len(found) < count:
        raise ServeError(f"--fit-memory on a GPU: {len(found)} CUDA device(s) visible, --tensor-parallel-size needs "
                         f"{count}; {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}".rstrip("; "))
    return [(int(free), int(total)) for free, total in found]


def budget_settings(fit, *, device: str, extra: list[str], memory_of=cuda_memory) -> VllmSettings:
    """The settings that serve `fit` (a budget.FitResult of a memory budget) as planned, on `device` ('cpu':
    vLLM-CPU, 'cuda'); `extra`: the user's vLLM arguments (a --block-size there changes the CPU blocks)."""
    st, cost = fit.settings, fit.cost
    planned = dict(max_model_len=st["max_model_len"], max_num_seqs=st["max_num_seqs"], dtype=st["dtype"],
                   kv_cache_dtype=None if st["kv_cache_dtype"] == "auto" else st["kv_cache_dtype"])
    if device == "cpu":
        block = flag_value(extra, "--block-size") or str(CPU_BLOCK_SIZE)
        if not block.isdigit() or int(block) < 1:
            raise ServeError(f"--block-size {block} after --: give a number of tokens, e.g. --block-size 128")
        kv = cpu_kv_cache_bytes(cost.kv_bytes_per_token, st["max_model_len"], st["max_num_seqs"], int(block))
        _check_cpu_kv_env(kv)
        return VllmSettings(**planned, kv_cache_memory_bytes=kv)
    if has_flag(extra, "--kv-cache-memory-bytes"):
        raise ServeError("--kv-cache-memory-bytes after -- overrides the budget's --gpu-memory-utilization on a GPU: "
                         "drop it (--fit-memory sizes the KV cache)")
    return VllmSettings(**planned, gpu_memory_utilization=gpu_memory_utilization(st["memory"],
                                                                                 memory_of(st["tp_size"])))


def _check_cpu_kv_env(kv: int) -> None:
    """vLLM-CPU reads VLLM_CPU_KVCACHE_SPACE (GiB) after its arguments: set, it would replace the planned size."""
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    if space and not (space.isdigit() and int(space) * GiB == kv):
        raise ServeError(f"VLLM_CPU_KVCACHE_SPACE={space} in the environment would replace the planned KV cache "
                         f"({kv} bytes, --kv-cache-memory-bytes): unset it to serve with --fit-memory")


# ---- what vLLM made of it
def kv_cache_blocks(metrics: str) -> tuple[int, int] | None:
    """(blocks, tokens per block) of vLLM's KV cache, from the text of its /metrics (the labels of
    vllm:cache_config_info); None when it does not say."""
    found = re.search(r"^vllm:cache_config_info\{([^}]*)\}", metrics, re.M)
    labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1))) if found else {}
    try:
        return int(labels["num_gpu_blocks"]), int(labels["block_size"])
    except (KeyError, ValueError):
        return None


def capacity_line(metrics: str, settings: VllmSettings) -> str:
    """Whether the KV cache vLLM allocated holds the planned sequences at full length at once."""
    length, seqs = settings.max_model_len, settings.max_num_seqs
    found = kv_cache_blocks(metrics)
    if found is None:
        return "warning: vLLM's /metrics does not say how large its KV cache is; its log line 'KV cache size' does"
    blocks, block = found
    held = (blocks - 1) // -(-length // block)  # whole blocks per sequence; one block is vLLM's null block
    said = f"{blocks} blocks of {block} tokens: {held} sequences of {length} tokens at once"
    if held >= seqs:
        return f"  vLLM's KV cache: {said} (planned {seqs})"
    return (f"warning: vLLM's KV cache holds fewer sequences than planned ({said}, planned {seqs}): the runtime "
            "took more than --reserve; raise --reserve, or lower --max-num-seqs / --max-model-len")
