"""What verifying an artifact costs a load: `load(artifact, 0.4)` with and without verification, side by side.

    python bench/verify_cost.py [--work /tmp/gisp-load-bench] [--repeats 5] [--out bench/results/verify_cost.json]

The source is bench/load_cpu.py's random-weight Llama of about 1.5B parameters (bf16, 4 shards, a
--no-copy-weights artifact). One process, warm page cache, a fresh record of verified files: the first verified
load hashes every file (reported on its own), then loads with and without verification alternate, so that both
are timed in the same window; each timing is reported with its spread, and the ratio of the medians with the
ratios of every pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/gisp-load-bench")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "verify_cost.json"))
    args = ap.parse_args()
    from load_cpu import make_random_checkpoint

    art = make_random_checkpoint(Path(args.work))
    os.environ["GISP_DEPLOY_CACHE"] = tempfile.mkdtemp(prefix="gisp-verify-cost-")  # nothing verified yet
    import torch

    from gisp_deploy.artifact import load_artifact
    from gisp_deploy.slicing.loader import load

    load(art, args.sparsity, dtype=torch.bfloat16, verify=False)  # warm the page cache and the imports
    t = time.perf_counter()
    load_artifact(art)
    first = time.perf_counter() - t
    timings = {"verified": [], "unverified": []}
    for _ in range(args.repeats):
        for mode in ("verified", "unverified"):
            t = time.perf_counter()
            model = load(art, args.sparsity, dtype=torch.bfloat16, verify=mode == "verified")
            timings[mode].append(time.perf_counter() - t)
            del model
    med = {k: statistics.median(v) for k, v in timings.items()}
    pairs = [a / b for a, b in zip(timings["verified"], timings["unverified"])]
    spread = {k: (min(v), med[k], max(v)) for k, v in timings.items()}
    result = {"command": "python bench/verify_cost.py " + " ".join(sys.argv[1:]), "artifact": str(art),
              "sparsity": args.sparsity, "first_verification_s": first, "timings_s": timings,
              "min_median_max_s": spread, "ratio_of_medians": med["verified"] / med["unverified"],
              "pair_ratios": pairs, "cpus": len(os.sched_getaffinity(0))}
    if max(pairs) - min(pairs) > 0.2:
        result["warning"] = "the pair ratios disagree by more than 0.2: the machine's load changed during the run"
        print("warning:", result["warning"])
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"first verification (hashes every file): {first:.2f} s")
    for k, (lo, mid, hi) in spread.items():
        print(f"load at {args.sparsity}, {k:10s}: median {mid:.3f} s (min {lo:.3f}, max {hi:.3f}) over {args.repeats}")
    print(f"verified / unverified: {result['ratio_of_medians']:.3f} (pairs {min(pairs):.3f}..{max(pairs):.3f})")


if __name__ == "__main__":
    main()
