"""What filling fresh host memory and gathering kept rows / columns cost on this CPU: the numbers behind
safetensors_file.fresh_zeros (huge pages, faulted on first write) and safetensors_file.take (numpy's take).

    python bench/host_memory.py [--out bench/results/host_memory.json] [--mb 1800] [--repeats 4]

Fill: an anonymous mapping of --mb MiB, written once (torch fill_), four ways, alternated, --repeats rounds:
4 KiB pages faulted on first write, MAP_POPULATE, MADV_HUGEPAGE faulted on first write, MADV_HUGEPAGE +
MADV_POPULATE_WRITE; each both in one long-lived process (memory it freed before is reused) and in a fresh
process per fill (as a loader starts: on this VM the guest's free memory is handed back to the host, and
getting it again is what costs). Gather: 4915 of 8192 random rows of a [8192, 2048] bf16 matrix and columns of a
[2048, 8192] one (a 0.4 slice's MLP) into preallocated outputs: torch.index_select with the default
threads, with one thread, and numpy take on int16 views (mode="clip"); bytes/s of output. Times are
min / median / max of the repeats; the machine is shared (load average recorded).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def fill(kind: str, nbytes: int) -> float:
    t = time.perf_counter()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (mmap.MAP_POPULATE if kind == "4k populate" else 0)
    m = mmap.mmap(-1, nbytes, flags=flags)
    if kind.startswith("huge"):
        m.madvise(mmap.MADV_HUGEPAGE)
    if kind == "huge populate":
        m.madvise(POPULATE_WRITE)
    x = torch.frombuffer(m, dtype=torch.uint8)
    x.fill_(1)
    dt = time.perf_counter() - t
    del x
    m.close()
    return dt


def fresh_fill(kind: str, nbytes: int) -> float:
    """fill() in a new process."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--mb", str(nbytes >> 20)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def stats(ts: list[float], nbytes: int) -> dict:
    return {"min_s": min(ts), "median_s": statistics.median(ts), "max_s": max(ts),
            "gb_s_at_median": nbytes / statistics.median(ts) / 1e9, "disagree": max(ts) / min(ts) > 1.25}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "host_memory.json"))
    ap.add_argument("--mb", type=int, default=1800)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    nbytes = args.mb << 20
    if args.child:
        print(fill(args.child, nbytes))
        return
    kinds = ["4k", "4k populate", "huge", "huge populate"]
    fills: dict[str, list[float]] = {f"{k}{w}": [] for k in kinds for w in ("", ", fresh process")}
    for _ in range(args.repeats):
        for k in kinds:
            fills[k].append(fill(k, nbytes))
            fills[f"{k}, fresh process"].append(fresh_fill(k, nbytes))
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(8192, generator=g)[:4915].sort().values
    rows_src = torch.randn(8192, 2048, generator=g).to(torch.bfloat16)
    cols_src = torch.randn(2048, 8192, generator=g).to(torch.bfloat16)
    rows_out = torch.empty(4915, 2048, dtype=torch.bfloat16)
    cols_out = torch.empty(2048, 4915, dtype=torch.bfloat16)
    threads = torch.get_num_threads()

    def isel(src, dim, out, n):
        torch.set_num_threads(n)
        torch.index_select(src, dim, keep, out=out)
        torch.set_num_threads(threads)

    def nptake(src, dim, out):
        np.take(src.view(torch.int16).numpy(), keep.numpy(), axis=dim, out=out.view(torch.int16).numpy(), mode="clip")

    cases = {f"{what} torch.index_select ({n} thread{'s' * (n > 1)})": (lambda s=s, d=d, o=o, n=n: isel(s, d, o, n))
             for what, s, d, o in (("rows", rows_src, 0, rows_out), ("cols", cols_src, 1, cols_out))
             for n in sorted({threads, 1})}
    cases.update({f"{what} numpy take": (lambda s=s, d=d, o=o: nptake(s, d, o))
                  for what, s, d, o in (("rows", rows_src, 0, rows_out), ("cols", cols_src, 1, cols_out))})
    gathers: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(5 * args.repeats):  # alternated
        for k, fn in cases.items():
            t = time.perf_counter()
            fn()
            gathers[k].append(time.perf_counter() - t)
    out_bytes = 4915 * 2048 * 2
    result = {"command": "python bench/host_memory.py " + " ".join(sys.argv[1:]), "cpus": os.cpu_count(),
              "torch_threads": threads, "loadavg_1m": os.getloadavg()[0], "fill_mb": args.mb,
              "fill": {k: stats(v, nbytes) for k, v in fills.items()},
              "gather_output_mb": out_bytes / 2**20, "gather": {k: stats(v, out_bytes) for k, v in gathers.items()}}
    Path(args.out).write_text(json.dumps(result, indent=2))
    for group in ("fill", "gather"):
        for k, r in result[group].items():
            print(f"{group:6s} {k:40s} median {r['median_s'] * 1e3:8.1f} ms ({r['min_s'] * 1e3:.1f}-"
                  f"{r['max_s'] * 1e3:.1f}) {r['gb_s_at_median']:6.2f} GB/s{'  (repeats disagree)' * r['disagree']}")


if __name__ == "__main__":
    main()
