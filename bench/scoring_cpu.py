"""GISP run time on CPU, `--compute masked` vs `compact`, on the reference model; are the rankings the same?

    python bench/scoring_cpu.py [--out bench/results/scoring_cpu.json] [--samples 32] [--steps 8]

The trained reference model (examples/tiny-llama-gqa-19m, fp32), calibration windows of examples/data/train, GISP
to sparsity 0.5 under both schedules. Reports wall time of `prune` per mode and how the rankings compare:
removal order, per-step removed sets, and the largest relative score difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "tiny-llama-gqa-19m"
TRAIN = ROOT / "examples" / "data" / "train"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scoring_cpu.json"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-sparsity", type=float, default=0.5)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gisp_deploy.data import load_calibration
    from gisp_deploy.families import ModelShape
    from gisp_deploy.pruning.methods import ComputeOptions, PruneConfig, prune

    tok = AutoTokenizer.from_pretrained(MODEL)
    calib = load_calibration("lm", tok, [TRAIN], args.samples, args.seq_len, seed=0)
    rows = []
    for schedule in ("params", "structures"):
        cfg = PruneConfig(steps=args.steps, max_sparsity=args.max_sparsity, schedule=schedule, batch_size=16)
        got = {}
        for mode in ("masked", "compact"):
            model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
            shape = ModelShape.from_config(model.config)
            t = time.perf_counter()
            got[mode] = prune(model, shape, calib, cfg, compute=ComputeOptions(mode))
            wall = time.perf_counter() - t
            rows.append({"schedule": schedule, "compute": mode, "wall_s": round(wall, 2)})
            print(json.dumps(rows[-1]), flush=True)
        a, b = got["masked"], got["compact"]
        n = a.num_covered
        keys = lambda r: list(zip(r.layer[:n].tolist(), r.kind[:n].tolist(), r.index[:n].tolist()))  # noqa: E731
        steps_equal = all(set(zip(*(getattr(a, f)[:n][a.step[:n] == s] for f in ("layer", "kind", "index"))))
                          == set(zip(*(getattr(b, f)[:n][b.step[:n] == s] for f in ("layer", "kind", "index"))))
                          for s in set(a.step[:n].tolist()))
        cover = max(abs(a.score[i] - b.score[i]) / max(abs(a.score[i]), 1e-30) for i in range(len(a.score)))
        compare = {"schedule": schedule, "covered": n, "same_covered_count": b.num_covered == n,
                   "positions_differing": int(sum(x != y for x, y in zip(keys(a), keys(b)))),
                   "per_step_sets_equal": bool(steps_equal), "max_rel_score_diff": float(cover),
                   "speedup": round(rows[-2]["wall_s"] / rows[-1]["wall_s"], 3)}
        rows.append(compare)
        print(json.dumps(compare), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": f"python bench/scoring_cpu.py --samples {args.samples} --seq-len {args.seq_len} "
                   f"--steps {args.steps} --max-sparsity {args.max_sparsity}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "model": "examples/tiny-llama-gqa-19m (fp32)", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
