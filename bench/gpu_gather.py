"""GPU bandwidth of ragged row/column gathers (Triton) vs index_select vs a plain copy, Llama-2-7B shapes.

Run: PYTHONPATH=. python bench/gpu_gather.py --out DIR          (needs CUDA, ~1 min on one H200)
     PYTHONPATH=. python bench/gpu_gather.py --out DIR --smoke  (CPU, tiny shapes, Triton interpreter)
Bandwidth counts bytes of kept data read + written (2 x output bytes). For random column keeps the
DRAM must still read (almost) every source sector, so `dram_gbps` also reports bytes per time on a
lower bound of the real traffic (32-byte sectors touched + bytes written).
Cases: each projection kind of all 32 layers in one call, and the two calls of one loader round (the layers
whose dense tensors fill gisp_deploy.slicing.loader.GATHER_BUDGET: q/k/v/gate/up rows, o/down columns).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="directory for gather_bandwidth.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU uses TRITON_INTERPRET=1")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--keep", type=float, default=0.6, help="kept fraction per layer")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-sweep", action="store_true", help="only the default tile configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="cProfile the host side of a few calls")
    p.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke and os.environ.get("TRITON_INTERPRET") is None:
    # Decided before triton is imported; a no-op on a CUDA machine unless there is no CUDA.
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except Exception:
        pass

import torch  # noqa: E402

from gisp_deploy.kernels import gather as G  # noqa: E402
from gisp_deploy.slicing.loader import GATHER_BUDGET  # noqa: E402


def shapes(smoke: bool, layers):
    if smoke:
        return dict(layers=layers or 2, hidden=64, inter=176, heads=4, head_dim=16)
    return dict(layers=layers or 32, hidden=4096, inter=11008, heads=32, head_dim=128)


def rand_keep(n: int, frac: float, gen: torch.Generator) -> torch.Tensor:
    k = max(1, round(frac * n))
    return torch.randperm(n, generator=gen)[:k].sort().values  # [k] int64, sorted


def head_keep(heads: int, head_dim: int, frac: float, gen: torch.Generator) -> torch.Tensor:
    h = rand_keep(heads, frac, gen)  # kept heads
    return (h[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)  # [h*hd]


def sectors_touched(keep: torch.Tensor, esize: int) -> int:
    """Distinct 32-byte sectors of one source row that hold a kept column."""
    return int(torch.unique(keep * esize // 32).numel())


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps: int, warmup: int) -> tuple:
        """(median seconds of single timed calls, mean seconds per call of `reps` back-to-back
        calls). The first includes host-side work that leaves the GPU idle; the second lets the
        host run ahead of the GPU, as a loader issuing many calls would."""
        for _ in range(warmup):
            fn()
        times = []
        if self.cuda:
            torch.cuda.synchronize()
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                fn()
            b.record()
            b.synchronize()
            return statistics.median(times), a.elapsed_time(b) / 1e3 / reps
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), statistics.mean(times)


class LaunchCapture:
    """Records the Triton launches made by kernels.gather, to time the kernels alone."""

    def __init__(self):
        self.calls = []
        self.active = False
        real = G._kernel
        cap = self

        class _Wrap:
            def __init__(self, kern):
                self.kern = kern

            def __getitem__(self, grid):
                def launch(*a, **kw):
                    if cap.active:
                        cap.calls.append((self.kern, grid, a, kw))
                    return self.kern[grid](*a, **kw)

                return launch

        G._kernel = lambda name: _Wrap(real(name))

    def replay(self):
        for kern, grid, a, kw in self.calls:
            kern[grid](*a, **kw)


def host_seconds(fn, reps: int) -> float:
    """Median host time of one call (no synchronisation: what the GPU waits for when idle)."""
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


ROW_SWEEP = [dict(block_r=8, block_c=1024, num_warps=4), dict(block_r=8, block_c=1024, num_warps=8),
             dict(block_r=4, block_c=1024, num_warps=4), dict(block_r=4, block_c=2048, num_warps=4),
             dict(block_r=4, block_c=2048, num_warps=8), dict(block_r=16, block_c=1024, num_warps=8),
             dict(block_r=8, block_c=2048, num_warps=8), dict(block_r=2, block_c=4096, num_warps=8),
             dict(block_r=16, block_c=512, num_warps=4), dict(block_r=32, block_c=512, num_warps=8)]
COL_SWEEP = [dict(block_r=16, block_k=256, num_warps=4), dict(block_r=8, block_k=256, num_warps=4),
             dict(block_r=16, block_k=256, num_warps=8), dict(block_r=8, block_k=512, num_warps=4),
             dict(block_r=32, block_k=128, num_warps=4), dict(block_r=32, block_k=256, num_warps=8),
             dict(block_r=4, block_k=1024, num_warps=4), dict(block_r=64, block_k=64, num_warps=4)]


def main() -> int:
    args = ARGS
    if not args.smoke and not torch.cuda.is_available():
        print("needs CUDA (use --smoke for a CPU check)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    s = shapes(args.smoke, args.layers)
    L, H, I, NH, HD = s["layers"], s["hidden"], s["inter"], s["heads"], s["head_dim"]
    gen = torch.Generator().manual_seed(args.seed)
    reps, warmup = (2, 1) if args.smoke and device.type == "cpu" else (args.reps, args.warmup)
    timer = Timer(device)
    capture = LaunchCapture()
    esize = torch.finfo(dtype).bits // 8

    mlp_keep = [rand_keep(I, args.keep, gen) for _ in range(L)]  # channels kept per layer
    attn_keep = [head_keep(NH, HD, args.keep, gen) for _ in range(L)]  # q/k/v rows, o cols
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    R = max(1, min(L, round(GATHER_BUDGET / ((4 * H * NH * HD + 3 * H * I) * esize))))  # layers per loader round
    cases = {  # name: (kind, make weights, keep); weights are made one case at a time (memory)
        "mlp_gate_up_rows": ("rows", lambda: [rnd(I, H) for _ in range(2 * L)],
                             [k for k in mlp_keep for _ in (0, 1)]),
        "mlp_down_cols": ("cols", lambda: [rnd(H, I) for _ in range(L)], mlp_keep),
        "attn_qkv_rows": ("rows", lambda: [rnd(NH * HD, H) for _ in range(3 * L)],
                          [k for k in attn_keep for _ in (0, 1, 2)]),
        "attn_o_cols": ("cols", lambda: [rnd(H, NH * HD) for _ in range(L)], attn_keep),
        # What the loader issues per round (gisp_deploy.slicing.loader.GATHER_BUDGET of dense tensors, a few layers):
        # one call for the q, k, v, gate, up rows and one for the o, down columns of those layers.
        "loader_round_rows": ("rows", lambda: [rnd(n, H) for _ in range(R) for n in (NH * HD,) * 3 + (I, I)],
                              [k for a, m in zip(attn_keep[:R], mlp_keep[:R]) for k in (a, a, a, m, m)]),
        "loader_round_cols": ("cols", lambda: [rnd(H, n) for _ in range(R) for n in (NH * HD, I)],
                              [k for a, m in zip(attn_keep[:R], mlp_keep[:R]) for k in (a, m)]),
    }
    result = dict(
        device=torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=getattr(G.triton, "__version__", None),
        interpret=G.interpreting(),
        smoke=args.smoke,
        shapes=s,
        dtype=str(dtype),
        keep_fraction=args.keep,
        reps=reps,
        timing_note=("CPU/interpreter timings are meaningless" if device.type == "cpu"
                     else "median of CUDA-event timings of whole calls (incl. host-side table setup)"),
        cases={},
    )
    t_start = time.time()
    for name, (kind, make, ks) in cases.items():
        if args.cases and name not in args.cases.split(","):
            continue
        ws = make()
        dim = 0 if kind == "rows" else 1
        ks_dev = [k.to(device) for k in ks]
        kept_elems = sum(k.numel() * w.shape[1 - dim] for w, k in zip(ws, ks))
        kept_bytes = kept_elems * esize
        moved = 2 * kept_bytes  # read + write of kept data
        if kind == "rows":
            dram = moved
        else:  # lower bound on real traffic: touched sectors of every source row + output
            dram = kept_bytes + sum(w.shape[0] * 32 * sectors_touched(k, esize) for w, k in zip(ws, ks))
        flat = torch.empty(kept_elems, device=device, dtype=dtype)
        t_copy, _ = timer(lambda: flat.clone(), reps, warmup)
        del flat
        ref = [w.index_select(dim, k) for w, k in zip(ws, ks_dev)]
        t_ref, t_ref_b2b = timer(lambda: [w.index_select(dim, k) for w, k in zip(ws, ks_dev)], reps, warmup)
        ref_host = host_seconds(lambda: [w.index_select(dim, k) for w, k in zip(ws, ks_dev)], reps)
        fn = G.gather_rows if kind == "rows" else G.gather_cols
        sweep = [{}, dict(flat=True)] + ([] if args.no_sweep else (ROW_SWEEP if kind == "rows" else COL_SWEEP))
        runs = []
        exact = True
        for cfg in sweep:
            out = fn(ws, ks_dev, **cfg)  # also compiles
            ok = all(torch.equal(o.view(torch.int16), r.view(torch.int16)) for o, r in zip(out, ref))
            exact &= ok
            del out
            t, t_b2b = timer(lambda: fn(ws, ks_dev, **cfg), reps, warmup)
            host = host_seconds(lambda: fn(ws, ks_dev, **cfg), reps)
            capture.calls.clear()
            capture.active = True
            keep_alive = fn(ws, ks_dev, **cfg)  # the captured tables point at these outputs
            capture.active = False
            t_k, t_k_b2b = timer(capture.replay, reps, warmup)
            n_launches = len(capture.calls)
            del keep_alive
            capture.calls.clear()
            runs.append(dict(config=cfg or "default", seconds=t, host_seconds=host,
                             gbps=moved / t / 1e9,
                             dram_gbps=dram / t / 1e9, back_to_back_gbps=moved / t_b2b / 1e9,
                             kernel_gbps=moved / t_k / 1e9, kernel_back_to_back_gbps=moved / t_k_b2b / 1e9,
                             launches=n_launches,
                             exact=ok))
        del ref
        if args.profile:
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(5):
                fn(ws, ks_dev)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
            print(f"--- host profile of 5 calls, {name} ---")
            print("\n".join(buf.getvalue().splitlines()[4:]))
        best = min(runs, key=lambda r: r["seconds"])
        entry = dict(
            kind=kind, matrices=len(ws), shape=list(ws[0].shape), kept_bytes=kept_bytes,
            moved_bytes=moved, dram_lower_bound_bytes=dram,
            copy_gbps=moved / t_copy / 1e9, index_select_gbps=moved / t_ref / 1e9,
            index_select_dram_gbps=dram / t_ref / 1e9,
            index_select_back_to_back_gbps=moved / t_ref_b2b / 1e9,
            index_select_host_seconds=ref_host,
            triton_default_gbps=runs[0]["gbps"], triton_flat_gbps=runs[1]["gbps"], triton_best_gbps=best["gbps"],
            triton_best_config=best["config"], triton_best_dram_gbps=best["dram_gbps"],
            triton_default_frac_of_copy=runs[0]["gbps"] / (moved / t_copy / 1e9),
            triton_best_frac_of_copy=best["gbps"] / (moved / t_copy / 1e9),
            ceiling_frac_of_copy=moved / dram,
            exact=exact, runs=runs,
        )
        result["cases"][name] = entry
        del ws, ks_dev
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["wall_seconds"] = time.time() - t_start
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9

    for e in result["cases"].values():
        k = max(e["runs"], key=lambda r: r["kernel_gbps"])
        e.update(kernel_best_gbps=k["kernel_gbps"], kernel_best_config=k["config"],
                 kernel_default_gbps=e["runs"][0]["kernel_gbps"],
                 kernel_default_frac_of_copy=e["runs"][0]["kernel_gbps"] / e["copy_gbps"],
                 kernel_best_frac_of_copy=k["kernel_gbps"] / e["copy_gbps"])
    hdr = f"{'case':18s} {'GB moved':>9s} {'copy':>8s} {'idx_sel':>8s} {'triton':>8s} {'best':>8s} {'best/copy':>9s} {'ceiling':>8s} {'dram':>8s} exact"
    print(hdr)
    for name, e in result["cases"].items():
        print(f"{name:18s} {e['moved_bytes'] / 1e9:9.3f} {e['copy_gbps']:8.1f} {e['index_select_gbps']:8.1f} "
              f"{e['triton_default_gbps']:8.1f} {e['triton_best_gbps']:8.1f} {e['triton_best_frac_of_copy']:9.2f} "
              f"{e['ceiling_frac_of_copy']:8.2f} {e['triton_best_dram_gbps']:8.1f} {e['exact']}")
        for r in e["runs"]:
            print(f"    {str(r['config']):55s} {r['gbps']:8.1f} GB/s  back-to-back "
                  f"{r['back_to_back_gbps']:8.1f}  kernel {r['kernel_gbps']:8.1f}  "
                  f"host {r['host_seconds'] * 1e6:6.0f} us  exact={r['exact']}")
        print(f"    {'index_select':55s} {e['index_select_gbps']:8.1f} GB/s  back-to-back "
              f"{e['index_select_back_to_back_gbps']:8.1f}  host {e['index_select_host_seconds'] * 1e6:7.0f} us")
    print(f"{'kernel only':18s} " + "  ".join(
        f"{n}: default {e['kernel_default_gbps']:.0f} ({e['kernel_default_frac_of_copy']:.2f} of copy), "
        f"best {e['kernel_best_gbps']:.0f} {e['kernel_best_config']}" for n, e in result["cases"].items()))
    print("(GB/s of kept bytes read+written; 'ceiling' = best possible fraction of copy given the sectors "
          "that must be read; 'dram' = GB/s on that lower bound of real traffic)")
    if device.type == "cpu":
        print("NOTE: CPU / interpreter run: timings are meaningless, only exactness counts.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gather_bandwidth.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out / 'gather_bandwidth.json'}")
    return 0 if all(e["exact"] for e in result["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
