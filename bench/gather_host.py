"""Host-side cost of one ragged gather call (tables, index checks, outputs), the kernel launch left out.

    python bench/gather_host.py [--out bench/results/gather_host.json] [--reps 30]

On a GPU the kernels move a Llama-2-7B attention matrix's kept rows in ~10 us, so a call's Python and
bookkeeping time per matrix decides whether a single call reaches the copy bandwidth (bench/gpu_gather.py
measures whole calls there). This measures that host time alone on the CPU: the Triton launch is replaced by
a no-op, the weights are empty 7B-shaped bf16 tensors (never read), and the kept indices are CPU int64
tensors, as the loader passes them (so they are range-checked). Median of --reps calls per case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton path on CPU tensors; its launches are stubbed below

import torch  # noqa: E402

from gisp_deploy.kernels import gather as G  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def cases(layers: int, keep: float, gen: torch.Generator) -> dict:
    hidden, inter, heads, hd = 4096, 11008, 32, 128

    def rand_keep(n):
        return torch.randperm(n, generator=gen)[:round(keep * n)].sort().values

    def head_keep():
        h = rand_keep(heads)
        return (h[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)

    empty = lambda *s: torch.empty(*s, dtype=torch.bfloat16)  # noqa: E731
    mlp = [rand_keep(inter) for _ in range(layers)]
    attn = [head_keep() for _ in range(layers)]
    return {
        "mlp_gate_up_rows": ("rows", [empty(inter, hidden) for _ in range(2 * layers)], [k.clone() for k in mlp for _ in (0, 1)]),
        "mlp_down_cols": ("cols", [empty(hidden, inter) for _ in range(layers)], mlp),
        "attn_qkv_rows": ("rows", [empty(heads * hd, hidden) for _ in range(3 * layers)],
                          [k.clone() for k in attn for _ in (0, 1, 2)]),
        "attn_o_cols": ("cols", [empty(hidden, heads * hd) for _ in range(layers)], attn),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/gather_host.json"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--keep", type=float, default=0.6)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    G._kernel = lambda name: _NoLaunch()
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for name, (kind, ws, ks) in cases(args.layers, args.keep, gen).items():
        fn = G.gather_rows if kind == "rows" else G.gather_cols
        for flat in (False, True):
            for _ in range(3):
                fn(ws, ks, flat=flat)
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                fn(ws, ks, flat=flat)
                times.append(time.perf_counter() - t)
            sec = statistics.median(times)
            rows[f"{name}{'_flat' if flat else ''}"] = {"matrices": len(ws), "host_ms": round(sec * 1e3, 3),
                                                       "host_us_per_matrix": round(sec * 1e6 / len(ws), 2)}
            print(f"{name:18s} flat={flat!s:5s} {len(ws):3d} matrices  {sec * 1e3:7.3f} ms  "
                  f"{sec * 1e6 / len(ws):6.2f} us/matrix", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": f"python bench/gather_host.py --layers {args.layers} --keep {args.keep} --reps {args.reps}",
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "note": "host time of one call, Triton launch stubbed out; CPU int64 indices (range-checked)",
        "cases": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
