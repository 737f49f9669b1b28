"""GISP on the embedded model on CUDA in bf16 through the library: runs, and agrees with the CPU fp32 ranking.

    PYTHONPATH=. python bench/gpu_smoke.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from gisp_deploy.artifact import load_artifact
from gisp_deploy.pruning.methods import PruneConfig
from gisp_deploy.pruning.run import run_prune

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    cfg = PruneConfig(samples=64, seq_len=256, batch_size=16, steps=10, max_sparsity=0.5)
    model = str(ROOT / "examples" / "tiny-llama-gqa-19m")
    calib = [str(ROOT / "examples" / "data" / "train")]
    report = {}
    for name, device, dtype in (("cuda-bf16", "cuda", "bfloat16"), ("cuda-fp32", "cuda", "float32")):
        t = time.perf_counter()
        s = run_prune(model, calib, out / f"art-{name}", cfg, device=device, dtype=dtype, overwrite=True,
                      copy_weights=False, log=lambda m: None)
        report[name] = {"wall_s": round(time.perf_counter() - t, 2), "tokens_per_s": round(s["tokens_per_s"]),
                        "coverage": s["coverage"]}
        print(name, report[name], flush=True)
    a = load_artifact(out / "art-cuda-bf16").ranking
    b = load_artifact(out / "art-cuda-fp32").ranking
    n = min(a.num_covered, b.num_covered)
    key = lambda r: set(zip(r.layer[:n].tolist(), r.kind[:n].tolist(), r.index[:n].tolist()))
    report["bf16_vs_fp32_removed_set_overlap"] = len(key(a) & key(b)) / n
    report["bf16_vs_fp32_identical_order_prefix"] = int(np.argmax(
        (a.layer[:n] != b.layer[:n]) | (a.index[:n] != b.index[:n]) | (a.kind[:n] != b.kind[:n])) or n)
    print(report, flush=True)
    (out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
