"""Score options x load-time refits: held-out perplexity (and task accuracy) of slices of given artifacts, via the CLI.

    python bench/scores_table.py NAME=ARTIFACT [NAME=ARTIFACT ...] [--refits none,ls] [--baseline gisp]
        [--sparsities 0.2,0.3,0.4,0.5] [--max-tokens 65536] [--task bench/tasks/continuation-test.margin.jsonl]
        [--include OTHER/results.json ...] [--out bench/results/scores]

--include adds the records (and commands) of earlier runs of this script, so artifacts evaluated as they
finished make one table; NAME=ARTIFACT:REFITS evaluates that artifact with its own refits (e.g. loop=DIR:ls).

Every (artifact, refit) pair is one `gisp-deploy eval --json` over both held-out texts (128-token windows); the
exact commands are written next to the numbers. Each perplexity is also given relative to the baseline's plain
slice at the same sparsity and text (the issue-17 goal: <= 0.90 at 0.4 and 0.5 on both texts, <= 1.00 at 0.2).
Perplexity is deterministic (fp32, fixed windows): one run each, no spread to report. Task accuracy on 300
items has a standard error of about 0.027: differences below ~0.05 are noise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from methods_table import run  # bench/ is this script's directory: runs and logs one CLI command

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT.parent / "shared" / "data" / "heldout"
TEXTS = [HELDOUT / "persuasion.txt.gz", HELDOUT / "treasury_of_david_tail.txt.gz"]


def evaluate(name: str, artifact: str, refit: str, args, log: list) -> list[dict]:
    cmd = [sys.executable, "-m", "gisp_deploy.cli", "eval", artifact, "--sparsities", args.sparsities,
           "--seq-lens", "128", "--max-tokens", str(args.max_tokens), "--json", "--refit", refit]
    for text in args.texts:
        cmd += ["--text", str(text)]
    if args.task:
        cmd += ["--task", args.task]
    report = json.loads(run(cmd, log))
    return [{"variant": name, "refit": refit, **r} for r in report["results"]]


def relative(results: list[dict], baseline: str) -> None:
    """ppl / the baseline's plain-slice ppl at the same sparsity and text, in place."""
    base = {(r["sparsity"], r["text"]): r["perplexity"] for r in results
            if r["variant"] == baseline and r["refit"] == "none" and "perplexity" in r}
    for r in results:
        key = (r["sparsity"], r.get("text"))
        if "perplexity" in r and key in base:
            r["vs_baseline"] = r["perplexity"] / base[key]


def table(results: list[dict], sparsities: list[float]) -> list[str]:
    texts = sorted({r["text"] for r in results if "perplexity" in r})
    head = ["variant", "refit", "metric"] + [f"{s:g}" for s in sparsities]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    rows: dict[tuple, dict] = {}
    for r in results:
        metric = f"ppl {r['text']}" if "perplexity" in r else f"acc {r.get('task', 'task')}"
        value = (f"{r['perplexity']:.1f}" + (f" ({r['vs_baseline']:.3f})" if "vs_baseline" in r else "")
                 if "perplexity" in r else f"{r['accuracy']:.3f}")
        rows.setdefault((r["variant"], r["refit"], metric), {})[r["sparsity"]] = value
    order = {t: i for i, t in enumerate(f"ppl {t}" for t in texts)}
    for (variant, refit, metric), cells in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                 order.get(kv[0][2], 99))):
        lines.append("| " + " | ".join([variant, refit, metric] + [cells.get(s, "") for s in sparsities]) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="*", help="NAME=ARTIFACT_DIR[:REFITS]")
    ap.add_argument("--include", nargs="*", default=[], help="results.json files of earlier runs")
    ap.add_argument("--refits", default="none,ls")
    ap.add_argument("--baseline", default="gisp", help="NAME whose plain slices the ratios divide by")
    ap.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--texts", nargs="+", default=[str(t) for t in TEXTS])
    ap.add_argument("--task", default="", help="multiple-choice JSONL, e.g. bench/tasks/continuation-test.margin.jsonl")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scores"))
    args = ap.parse_args()
    pairs = [a.split("=", 1) for a in args.artifacts]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit("error: give artifacts as NAME=DIR, e.g. gisp=/work/notes/artifacts/refit-gisp20")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    results = []
    for earlier in args.include:
        data = json.loads(Path(earlier).read_text())
        log += data["commands"]
        for r in data["results"]:
            r.pop("vs_baseline", None)  # recomputed against this table's baseline
            results.append(r)
    for name, artifact in pairs:
        artifact, _, refits = artifact.partition(":")
        for refit in (refits or args.refits).split(","):
            results += evaluate(name, artifact, refit, args, log)
    relative(results, args.baseline)
    sps = [float(s) for s in args.sparsities.split(",")]
    (out / "results.json").write_text(json.dumps({"command": shlex.join(sys.argv), "commands": log,
                                                  "results": results}, indent=2))
    lines = [f"Held-out perplexity (128-token windows, first {args.max_tokens:,} tokens of each text, fp32)"
             + (" and task accuracy" if args.task else "") + "; in brackets: perplexity / the baseline's plain slice "
             f"({args.baseline}, refit none) at the same sparsity and text.", "", *table(results, sps), "",
             "Produced by:", "", "    " + shlex.join(sys.argv), "", "Commands:", ""]
    lines += ["    " + c for c in log]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
