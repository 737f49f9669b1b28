"""vLLM decode speed of slices vs dense on CPU, on a random-weight Llama of about 1.5B parameters (bf16).

    python bench/speed_cpu.py [--work /tmp/gisp-load-bench] [--out bench/results/speed_cpu] [-- more bench options]

Writes the checkpoint and a random-method ranking once (bench/load_cpu.py's), then runs
`gisp-deploy bench ARTIFACT --sparsities 0.2,0.4,0.5 --speed` on it; results.json, report.md and
speedup.png land in --out. Short prompts keep the batch-16 prefill (compute-bound on two cores) from
dominating the run; the decode steps are what the speed-up is about. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main():
    from load_cpu import make_random_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/gisp-load-bench")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed_cpu"))
    ap.add_argument("rest", nargs="*", help="further `gisp-deploy bench` options, after --")
    args = ap.parse_args()
    art = make_random_checkpoint(Path(args.work))
    cmd = [sys.executable, "-m", "gisp_deploy.cli", "bench", str(art), "--sparsities", "0.2,0.4,0.5", "--speed",
           "--batch-sizes", "1,16", "--prompt-len", "16", "--gen-len", "32", "--repeats", "3",
           "--dtype", "bfloat16", "--out", args.out, *args.rest]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
