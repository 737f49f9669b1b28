"""Objectives x task accuracy on the reference model: does task-aligned calibration help on the task?

    python bench/objectives_table.py [--out bench/results/objectives]

Calibrates GISP with the lm objective (text windows), the margin objective (multiple-choice items built
from train text) and the answer objective (same items, loss on the true continuation), then scores every
slice on the held-out continuation task (bench/make_task.py) and held-out perplexity. Commands are
recorded next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TASKS = ROOT / "bench" / "tasks"


def run(cmd, log):
    log.append(shlex.join(cmd))
    print("$", log[-1], flush=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "tiny-llama-gqa-19m"))
    ap.add_argument("--sparsities", default="0,0.2,0.3,0.4,0.5")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "objectives"))
    ap.add_argument("--fresh", action="store_true", help="Re-prune even where an artifact is already there.")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "gisp_deploy.cli"]
    common = ["--steps", "20", "--max-sparsity", "0.5", "--protect-first", "0", "--protect-last", "1", "--seed", "0",
              "--dtype", "float32", "--batch-size", "16", "--overwrite"]
    setups = {
        "lm": ["--objective", "lm", "--calib", str(SHARED / "data" / "train"), "--samples", "128", "--seq-len", "256"],
        "margin": ["--objective", "margin", "--calib", str(TASKS / "continuation-calib.margin.jsonl"),
                   "--samples", "128", "--seq-len", "256"],
        "answer": ["--objective", "answer", "--calib", str(TASKS / "continuation-calib.answer.jsonl"),
                   "--samples", "128", "--seq-len", "256"],
    }
    log, results = [], []
    for name, opts in setups.items():
        art = out / f"artifact-{name}"
        prune_cmd = exe + ["prune", args.model, "--out", str(art), *opts, *common]
        if (art / "gisp.json").exists() and not args.fresh:  # a finished artifact of an earlier run of this script
            log.append(shlex.join(prune_cmd))
            print(f"reusing {art} (--fresh to re-prune)", flush=True)
        else:
            run(prune_cmd, log)
        rep = json.loads(run(exe + ["eval", str(art), "--sparsity", args.sparsities, "--json", "--text",
                                    str(SHARED / "data" / "heldout" / "persuasion.txt.gz"),
                                    "--task", str(TASKS / "continuation-test.margin.jsonl")], log))
        results += [{"objective": name, **r} for r in rep["results"]]
    (out / "results.json").write_text(json.dumps({"commands": log, "results": results}, indent=2))
    sps = [float(s) for s in args.sparsities.split(",")]
    lines = ["| objective | metric | " + " | ".join(f"{s:g}" for s in sps) + " |", "|---" * (len(sps) + 2) + "|"]
    for name in setups:
        acc = {r["sparsity"]: r["accuracy"] for r in results if r["objective"] == name and "accuracy" in r}
        ppl = {r["sparsity"]: r["perplexity"] for r in results if r["objective"] == name and "perplexity" in r}
        lines.append(f"| {name} | task accuracy | " + " | ".join(f"{acc[s]:.3f}" for s in sps) + " |")
        lines.append(f"| {name} | perplexity | " + " | ".join(f"{ppl[s]:.1f}" for s in sps) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text("Held-out continuation task (300 items, 4-way, bench/make_task.py) and perplexity "
                                  "(persuasion, 65,536 tokens, 128-token windows)\n\n" + table + "\n\nCommands:\n\n"
                                  + "\n".join(f"    {c}" for c in log) + "\n")
    print(table)


if __name__ == "__main__":
    main()
