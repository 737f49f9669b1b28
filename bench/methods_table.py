"""Methods x sparsities held-out perplexity on the reference model (DESIGN §7 setting), via the CLI.

    python bench/methods_table.py [--out bench/results/methods] [--methods gisp,oneshot,...]

Each method is pruned once with `gisp-deploy prune` and every slice evaluated with `gisp-deploy eval --json`;
the exact commands are written next to the numbers.
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
DEFAULT_MODEL = SHARED / "models" / "tiny-llama-gqa-19m"


def run(cmd: list[str], log: list) -> str:
    log.append(shlex.join(cmd))
    print("$", shlex.join(cmd), flush=True)
    t = time.perf_counter()
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    return res.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--calib", default=str(SHARED / "data" / "train"))
    ap.add_argument("--text", default=str(SHARED / "data" / "heldout" / "persuasion.txt.gz"))
    ap.add_argument("--methods", default="gisp,oneshot,wanda-sp,magnitude,random")
    ap.add_argument("--sparsities", default="0,0.2,0.3,0.4,0.5")
    ap.add_argument("--extra", default="", help="extra prune options, e.g. '--unit kv_group'")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "methods"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "gisp_deploy.cli"]
    log: list[str] = []
    results = []
    for method in args.methods.split(","):
        art = out / f"artifact-{method}"
        run(exe + ["prune", args.model, "--calib", args.calib, "--out", str(art), "--overwrite",
                   "--method", method, "--samples", "128", "--seq-len", "256", "--batch-size", "16",
                   "--steps", "20", "--max-sparsity", "0.5", "--schedule", "params", "--protect-first", "0",
                   "--protect-last", "1", "--seed", "0", "--dtype", "float32", *shlex.split(args.extra)], log)
        report = json.loads(run(exe + ["eval", str(art), "--sparsities", args.sparsities, "--text", args.text,
                                       "--seq-lens", "128", "--max-tokens", "65536", "--json"], log))
        for r in report["results"]:
            results.append({"method": method, **r})
    (out / "results.json").write_text(json.dumps({"commands": log, "results": results}, indent=2))
    sps = [float(s) for s in args.sparsities.split(",")]
    lines = ["| method | " + " | ".join(f"{s:g}" for s in sps) + " |", "|---" * (len(sps) + 1) + "|"]
    for method in args.methods.split(","):
        row = {r["sparsity"]: r["perplexity"] for r in results if r["method"] == method}
        lines.append(f"| {method} | " + " | ".join(f"{row[s]:.1f}" for s in sps) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text(
        "Held-out perplexity (persuasion, first 65,536 tokens, 128-token windows, fp32)\n\n" + table
        + "\n\nCommands:\n\n" + "\n".join(f"    {c}" for c in log) + "\n")
    print(table)


if __name__ == "__main__":
    main()
