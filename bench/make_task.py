"""Build the continuation decision task as JSONL: calibration items from train text, test items from held-out text.

    python bench/make_task.py --out bench/tasks [--items 200] [--calib-items 128]

Writes continuation-{calib,test}.margin.jsonl ({prompt, choices, answer}) and the matching
*.answer.jsonl ({prompt, answer}) for `--objective answer`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from gisp_deploy.quality.tasks import build_continuation_task, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "tiny-llama-gqa-19m"))
    ap.add_argument("--train", nargs="+", default=[str(SHARED / "data" / "train")])
    ap.add_argument("--heldout", nargs="+", default=[str(SHARED / "data" / "heldout" / "persuasion.txt.gz")])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--calib-items", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "bench" / "tasks"))
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, paths, n, seed in (("calib", args.train, args.calib_items, 1), ("test", args.heldout, args.items, 2)):
        rows = build_continuation_task(tok, paths, n, seed=seed)
        write_jsonl(rows, out / f"continuation-{name}.margin.jsonl")
        write_jsonl([{"prompt": r["prompt"], "answer": r["choices"][r["answer"]]} for r in rows],
                    out / f"continuation-{name}.answer.jsonl")
        print(f"wrote {len(rows)} items to {out}/continuation-{name}.*.jsonl")


if __name__ == "__main__":
    main()
