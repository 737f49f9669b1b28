"""Held-out perplexity of plain vs corrected slices (load(..., refit=)) on the reference model.

    python bench/refit_table.py ARTIFACT [ARTIFACT ...] [--refits none,ls,ec,ecr] [--sparsities 0.2,0.3,0.4,0.5]
        [--max-tokens 65536] [--tasks bench/tasks/continuation-test.margin.jsonl] [--out bench/results/refit]

For each artifact, sparsity and correction, the slice is loaded (its correction solved from the artifact's
calibration windows; `load_s` is that load, on this machine's CPU) and evaluated on both held-out texts at
128-token windows (the first --max-tokens tokens), and on each --tasks file (multiple-choice accuracy), exactly as
`gisp-deploy eval ARTIFACT --sparsities S --refit R --text T --seq-lens 128 --max-tokens N [--task F] --json` does
(same function, gisp_deploy.quality.evaluate.evaluate_slices, in one process so the model code is imported once).
Writes OUT/results.json (records, command, environment) and OUT/table.md after every slice, so an interrupted
run keeps what it measured. `--merge A/results.json B/results.json --out DIR` writes one table of several runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEXTS = [SHARED / "data" / "heldout" / "persuasion.txt.gz", SHARED / "data" / "heldout" / "treasury_of_david_tail.txt.gz"]


def table(records: list[dict], sparsities: list[float], refits: list[str], baseline: str | None = None) -> str:
    """One row per (artifact, correction): perplexity per text and sparsity, and the change against the plain
    slice of the same artifact (of `baseline`, an artifact's name, if given); then task accuracy per sparsity,
    where measured."""
    texts = sorted({r["text"] for r in records if r.get("measure", "perplexity") == "perplexity"})
    tasks = sorted({Path(r["task"]).stem for r in records if r.get("measure") == "accuracy"})
    head = "| artifact | refit | " + " | ".join(f"{t.split('.')[0][:10]} {s:g}" for t in texts for s in sparsities)
    head += "".join(f" | acc {t.split('.')[0][:12]} {s:g}" for t in tasks for s in sparsities) + " |"
    lines = [head, "|---" * (2 + (len(texts) + len(tasks)) * len(sparsities)) + "|"]
    ppl = {(r["name"], r["refit_asked"], r["sparsity"], r["text"]): r["perplexity"] for r in records
           if r.get("measure", "perplexity") == "perplexity"}
    acc = {(r["name"], r["refit_asked"], r["sparsity"], Path(r["task"]).stem): r["accuracy"] for r in records
           if r.get("measure") == "accuracy"}
    for name in dict.fromkeys(r["name"] for r in records):
        for refit in refits:
            if not any(k[0] == name and k[1] == refit for k in ppl):
                continue
            cells = []
            for t in texts:
                for s in sparsities:
                    v, base = ppl.get((name, refit, s, t)), ppl.get((baseline or name, "none", s, t))
                    if v is None:
                        cells.append("")
                    elif (name == (baseline or name) and refit == "none") or base is None:
                        cells.append(f"{v:.1f}")
                    else:
                        cells.append(f"{v:.1f} ({100 * (v / base - 1):+.1f}%)")
            for t in tasks:
                for s in sparsities:
                    v = acc.get((name, refit, s, t))
                    cells.append("" if v is None else f"{v:.3f}")
            lines.append(f"| {name} | {refit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, meta: dict, records: list[dict], sparsities: list[float], baseline: str | None = None) -> None:
    """OUT/results.json (records and how they were measured) and OUT/table.md."""
    (out / "results.json").write_text(json.dumps({**meta, "results": records}, indent=2) + "\n")
    commands = meta.get("commands", [meta["command"]])
    (out / "table.md").write_text(
        f"Held-out perplexity, 128-token windows, first {meta['max_tokens']:,} tokens of each text, fp32, CPU; "
        f"corrections with ridge {meta['ridge']:g} (relative); in parentheses: change against "
        + (f"{baseline}'s plain slice" if baseline else "the plain slice")
        + "; acc: multiple-choice accuracy on each task file.\n\n"
        + table(records, sparsities, list(dict.fromkeys(r["refit_asked"] for r in records)), baseline)
        + "\n\nCommands (results.json gives each record's):\n\n"
        + "\n".join(f"    {c}" for c in commands) + "\n\n"
        "Each cell is what `gisp-deploy eval ARTIFACT --sparsities S --refit R --text "
        "TEXT --seq-lens 128 --max-tokens N [--task F] --json` measures (results.json has each record's command).\n")


def merge(paths: list[str], out: Path, sparsities: list[float], command: str, baseline: str | None = None) -> None:
    """One table from several runs' results.json (each cell measured once, by the command its record names)."""
    metas, records, seen = [], [], set()
    for p in paths:
        d = json.loads(Path(p).read_text())
        metas.append(d)
        for r in d["results"]:
            key = (r["artifact"], r["sparsity"], r["refit_asked"], r.get("text"), r.get("task"))
            if key not in seen:
                seen.add(key)
                records.append({**r, "command": r.get("command", d["command"])})
    if len({(m["ridge"], m["max_tokens"]) for m in metas}) != 1:
        raise SystemExit("error: the runs differ in ridge or --max-tokens; merge runs of one setting")
    meta = {**metas[0], "command": command,
            "commands": sorted({c for m in metas for c in [m["command"], *m.get("commands", [])]})}
    meta.pop("results", None)
    out.mkdir(parents=True, exist_ok=True)
    write(out, meta, records, sparsities, baseline)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--merge", nargs="+", metavar="RESULTS_JSON", help="write OUT's table from these runs' "
                    "results.json instead of measuring")
    ap.add_argument("--baseline", help="with --merge: the artifact (directory name) whose plain slices every "
                    "change is measured against")
    ap.add_argument("--refits", default="none,ls,ec,ecr")
    ap.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--tasks", default="", help="comma-separated multiple-choice task files (JSONL), e.g. "
                    "bench/tasks/continuation-test.margin.jsonl")
    ap.add_argument("--ridge", type=float, default=None, help="relative ridge (default: refit.DEFAULT_RIDGE)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "refit"))
    ap.add_argument("--keep", action="store_true", help="keep OUT/results.json's records (each with the command "
                    "that measured it) and measure only the cells it lacks")
    args = ap.parse_args()
    command = shlex.join(["python", "bench/refit_table.py", *sys.argv[1:]])
    if args.merge:
        return merge(args.merge, Path(args.out), [float(x) for x in args.sparsities.split(",")], command,
                     args.baseline)
    import torch

    from gisp_deploy.artifact import load_artifact
    from gisp_deploy.hf import load_tokenizer
    from gisp_deploy.quality.evaluate import evaluate_slices
    from gisp_deploy.refit import DEFAULT_RIDGE

    torch.set_num_threads(args.threads)
    ridge = DEFAULT_RIDGE if args.ridge is None else args.ridge
    sparsities = [float(s) for s in args.sparsities.split(",")]
    refits = args.refits.split(",")
    tasks = [t for t in args.tasks.split(",") if t]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "ridge": ridge, "max_tokens": args.max_tokens, "seq_len": 128,
            "texts": [str(t) for t in TEXTS], "torch_threads": args.threads, "python": platform.python_version(),
            "torch": torch.__version__}
    records: list[dict] = []
    previous = out / "results.json"
    if args.keep and previous.is_file():
        old = json.loads(previous.read_text())
        records = [{**r, "command": r.get("command", old["command"])} for r in old["results"]]
        meta["commands"] = sorted({old["command"], *old.get("commands", []), command})
    done = {(r["artifact"], r["sparsity"], r["refit_asked"]) for r in records}
    for path in args.artifacts:
        art = load_artifact(path)
        tok = load_tokenizer(art.path)
        for s in sparsities:
            for refit in refits:
                if (str(art.path), s, refit) in done:
                    continue
                t = time.perf_counter()
                recs = evaluate_slices(art, tok, [s], [str(x) for x in TEXTS], (128,), max_tokens=args.max_tokens,
                                       refit=refit, ridge=ridge, tasks=tasks)
                wall = time.perf_counter() - t
                for r in recs:
                    r.update(refit_asked=refit, slice_and_eval_s=round(wall, 1), command=command,
                             eval_command=shlex.join(["gisp-deploy", "eval", str(path), "--sparsities", f"{s:g}",
                                                      "--refit", refit, *sum((["--text", str(x)] for x in TEXTS), []),
                                                      "--seq-lens", "128", "--max-tokens", str(args.max_tokens),
                                                      *sum((["--task", t] for t in tasks), []), "--json"]))
                records += recs
                print(json.dumps({"artifact": art.path.name, "s": s, "refit": refit,
                                  "ppl": [round(r["perplexity"], 2) for r in recs if "perplexity" in r],
                                  "acc": [round(r["accuracy"], 4) for r in recs if "accuracy" in r],
                                  "s_wall": round(wall, 1)}),
                      flush=True)
                write(out, meta, records, sparsities)


if __name__ == "__main__":
    main()
