"""What a load-time correction costs: load seconds on this CPU, and the FLOPs of the solve, measured and projected.

    python bench/refit_cost.py REFERENCE_ARTIFACT [--work /tmp/gisp-load-bench] [--big-windows 2x128]
        [--out bench/results/refit/cost.json]

- The reference model (REFERENCE_ARTIFACT, an artifact of tiny-llama-gqa-19m with its 128 x 256 calibration
  windows), fp32: load(..., 0.4, refit=R) for R in none / ls / ec / ecr, timed in turns (R1 R2 R3 R4, twice),
  the ls moments' cache emptied before each timing (a cold solve; `ls_warm` is the second slice of the same
  artifact, which reuses them).
- The random 1.5B Llama of bench/load_cpu.py (H 2048, I 8192, 24 layers), bf16, with a referenced copy of its
  weights and `--big-windows` random token windows as statistics (few: this CPU would need hours for 128 x 256),
  none and ls in turns.
- FLOPs of each variant from the shapes (counted below, the products of the fp64 moments, the layer passes and
  the Cholesky solves), for those runs and for a Llama-2-7B shape with 128 x 256 windows at s=0.4; the 7B's
  seconds on one H200 are projected from its fp64 / bf16 peak rates (67 / 989 TFLOP/s; stated, not measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def flops(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, head_dim: int, tokens: int,
          kept: float) -> dict[str, float]:
    """FLOPs of one corrected load, by variant: moments in fp64, layer passes in the model dtype, solves fp64."""
    q, kv = heads * head_dim, kv_heads * head_dim
    layer_params = hidden * (2 * q + 2 * kv) + 3 * hidden * inter
    pass_flops = 2 * tokens * layer_params  # one dense layer over the windows (attention scores left out)
    ko, kd = int(kept * q) + 1, int(kept * inter) + 1  # kept inputs (+ the constant)

    def solve(k: int) -> float:
        return k ** 3 / 3 + 2 * k * k * hidden  # Cholesky + the two triangular solves for `hidden` outputs

    ls_moments = 2 * tokens * ((q + 1) ** 2 + (inter + 1) ** 2)
    ec_moments = 2 * tokens * ((q + 1) * ko + ko * ko + (inter + 1) * kd + kd * kd)
    ecr_extra = 2 * tokens * hidden * (ko + kd)
    solves = solve(ko) + solve(kd)
    return {"ls": layers * (ls_moments + pass_flops + solves),
            "ec": layers * (ec_moments + (2 + 3 * kept) * pass_flops + solves),
            "ecr": layers * (ec_moments + ecr_extra + (2 + 3 * kept) * pass_flops + solves),
            "ls_fp64_share": ls_moments / (ls_moments + pass_flops)}


def timed_loads(art, sparsity: float, refits: list[str], rounds: int, dtype) -> dict[str, list[float]]:
    from gisp_deploy.slicing import correction
    from gisp_deploy.slicing.loader import load

    times: dict[str, list[float]] = {r: [] for r in refits}
    for _ in range(rounds):
        for refit in refits:  # in turns: every variant sees the same machine load
            correction._LS_CACHE.update(key=None, moments={})
            t = time.perf_counter()
            load(art, sparsity, dtype=dtype, refit=refit)
            times[refit].append(time.perf_counter() - t)
            if refit == "ls":  # the next slice of the same artifact: its moments are cached now
                t = time.perf_counter()
                load(art, min(sparsity + 0.1, 0.5), dtype=dtype, refit="ls")
                times.setdefault("ls_warm", []).append(time.perf_counter() - t)
    return times


def spread(ts: list[float]) -> dict:
    med = statistics.median(ts)
    out = {"median_s": round(med, 2), "min_s": round(min(ts), 2), "max_s": round(max(ts), 2),
           "runs_s": [round(t, 2) for t in ts]}
    if len(ts) > 1 and (max(ts) - min(ts)) / med > 0.10:
        out["warning"] = "repeats disagree by more than 10%"
    return out


def big_artifact(work: Path, windows: tuple[int, int]) -> Path:
    """The 1.5B random checkpoint (bench/load_cpu.py) as an artifact that references its weights and stores
    random token windows as its statistics."""
    import torch

    from gisp_deploy.artifact import write_artifact
    from gisp_deploy.data import Calibration
    from gisp_deploy.families import ModelShape
    from gisp_deploy.pruning.methods import PruneConfig, prune
    from load_cpu import make_random_checkpoint

    make_random_checkpoint(work)
    src = work / "random-1.5b"
    out = work / f"random-1.5b-refit-{windows[0]}x{windows[1]}"
    if out.exists():
        return out
    from transformers import AutoConfig

    shape = ModelShape.from_config(AutoConfig.from_pretrained(src))
    ranking = prune(None, shape, None, PruneConfig(method="random", max_sparsity=0.6, protect_first=0, protect_last=0))
    ids = torch.randint(3, 8192, windows, generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids)
    calib = Calibration(ids, ones, ones, torch.full((windows[0],), 1 / windows[0], dtype=torch.float64), "lm", ())
    write_artifact(out, src, ranking, {"method": "random"}, copy_weights=False, calibration=calib)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference")
    ap.add_argument("--work", default="/tmp/gisp-load-bench")
    ap.add_argument("--big-windows", default="2x128")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--refits", default="none,ls,ec,ecr", help="variants timed on the reference model")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "refit" / "cost.json"))
    args = ap.parse_args()
    import torch

    from gisp_deploy.artifact import load_artifact

    torch.set_num_threads(args.threads)
    result = {"command": " ".join(["python", "bench/refit_cost.py", *sys.argv[1:]]), "torch_threads": args.threads,
              "runs": []}
    ref = load_artifact(args.reference)
    n_ref = int(ref.manifest["statistics"]["samples"]) * int(ref.manifest["statistics"]["seq_len"])
    times = timed_loads(ref, 0.4, args.refits.split(","), args.rounds, torch.float32)
    f = flops(384, 1024, 8, 6, 2, 64, n_ref, 0.6)
    result["runs"].append({"model": "tiny-llama-gqa-19m", "dtype": "float32", "sparsity": 0.4, "tokens": n_ref,
                           "load": {k: spread(v) for k, v in times.items()},
                           "gflop": {k: round(v / 1e9, 1) for k, v in f.items() if k != "ls_fp64_share"}})
    print(json.dumps(result["runs"][-1]), flush=True)
    if not args.skip_big:
        win = tuple(int(x) for x in args.big_windows.split("x"))
        big = load_artifact(big_artifact(Path(args.work), win))
        times = timed_loads(big, 0.4, ["none", "ls"], 1, torch.bfloat16)
        f = flops(2048, 8192, 24, 16, 4, 128, win[0] * win[1], 0.6)
        result["runs"].append({"model": "random Llama 1.5B", "dtype": "bfloat16", "sparsity": 0.4,
                               "tokens": win[0] * win[1], "load": {k: spread(v) for k, v in times.items()},
                               "gflop": {k: round(v / 1e9, 1) for k, v in f.items() if k != "ls_fp64_share"}})
        print(json.dumps(result["runs"][-1]), flush=True)
    f7 = flops(4096, 11008, 32, 32, 32, 128, 128 * 256, 0.6)
    fp64_peak, bf16_peak = 67e12, 989e12
    result["projection_7b_h200"] = {
        "shape": "Llama-2-7B (32 layers, H 4096, I 11008, 32 heads), 128 x 256 windows, s=0.4",
        "tflop": {k: round(v / 1e12, 1) for k, v in f7.items() if k != "ls_fp64_share"},
        "ls_fp64_share": round(f7["ls_fp64_share"], 3),
        "seconds_at_peak_ls": round(f7["ls"] * f7["ls_fp64_share"] / fp64_peak
                                    + f7["ls"] * (1 - f7["ls_fp64_share"]) / bf16_peak, 1),
        "peaks": "H200: 67 TFLOP/s fp64 (tensor core), 989 TFLOP/s bf16 dense; stated, not measured",
    }
    print(json.dumps(result["projection_7b_h200"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
