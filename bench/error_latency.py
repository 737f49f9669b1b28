"""How long a mistyped command takes to say so: wall time of `gisp-deploy` bad-argument errors, in fresh processes.

    python bench/error_latency.py [--repeats 5] [--out bench/results/error_latency.json]

Each case runs `python -m gisp_deploy.cli ...` --repeats times in turns (case A, B, ..., then again), so every
case sees the same machine load; reports min / median / max seconds and checks that each printed one `error:`
line and exited with status 2. The interpreter's own start-up is measured alongside (`python -c pass`) as the
floor no command can beat. Needs no artifact: every case fails on its arguments.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = "examples/data/heldout/persuasion.txt.gz"
CASES = {
    "python -c pass (floor)": None,
    "inspect runs/demoo": ["inspect", "runs/demoo"],
    "eval --sparsities 1.5": ["eval", "runs/demo", "--sparsities", "1.5", "--text", HELDOUT],
    "eval --text nothere.txt": ["eval", "runs/demo", "--text", "nothere.txt"],
    "eval --dtype foo": ["eval", "runs/demo", "--text", HELDOUT, "--dtype", "foo"],
    "eval --max-tokens 1": ["eval", "runs/demo", "--text", HELDOUT, "--max-tokens", "1"],
    "prune --calib calib.txt": ["prune", "examples/tiny-llama-gqa-19m", "--calib", "calib.txt", "--out", "/tmp/x"],
    "bench --seq-lens 1": ["bench", "runs/demo", "--seq-lens", "1"],
}


def run_once(argv) -> float:
    cmd = [sys.executable, "-c", "pass"] if argv is None else [sys.executable, "-m", "gisp_deploy.cli", *argv]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if argv is not None and (p.returncode != 2 or p.stderr.count("error:") != 1):
        raise SystemExit(f"{' '.join(argv)}: expected one error line and exit 2, got {p.returncode}:\n{p.stderr}")
    return wall


def main(repeats: int = 5, out: str = str(ROOT / "bench" / "results" / "error_latency.json")) -> dict:
    times = {name: [] for name in CASES}
    for _ in range(repeats):
        for name, argv in CASES.items():
            times[name].append(run_once(argv))
    rows = {name: {"min_s": min(ts), "median_s": statistics.median(ts), "max_s": max(ts), "runs_s": ts}
            for name, ts in times.items()}
    print(f"{'case':28s} {'min s':>7s} {'median s':>9s} {'max s':>7s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['min_s']:7.3f} {r['median_s']:9.3f} {r['max_s']:7.3f}")
    result = {"command": "python bench/error_latency.py --repeats " + str(repeats), "repeats": repeats,
              "python": sys.version.split()[0], "cases": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "error_latency.json"))
    main(**vars(ap.parse_args()))
