"""Bytes of the statistics a load-time correction (--refit) needs, for a Llama-2-7B shape, per stored form.

    python bench/refit_statistics_size.py [--out bench/results/refit/statistics_size.json]

Counted, not estimated: each form's tensor sizes for 32 layers, H=4096, I=11008 (o_proj input = H, down_proj
input = I), against the bf16 checkpoint's decoder + embedding bytes (6.74e9 parameters x 2 bytes).
Forms: full second moments E[x̃x̃ᵀ] of both consumer inputs (symmetric: upper triangle stored), block-diagonal
(blocks of 128 inputs, heads / channel groups), low-rank (r eigenpairs + the diagonal), and the calibration
windows alone (moments recomputed at load time from the dense weights, layer by layer: what gisp-deploy stores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LAYERS, HIDDEN, INTER, VOCAB = 32, 4096, 11008, 32000
CHECKPOINT_PARAMS = 6_738_415_616  # Llama-2-7B: decoder + embeddings + lm_head
WINDOWS = (128, 256)  # samples x seq_len of the default calibration


def sym(n: int) -> int:
    return n * (n + 1) // 2  # values of a symmetric n x n matrix (upper triangle)


def forms(value_bytes: int) -> dict[str, int]:
    ins = (HIDDEN + 1, INTER + 1)  # x̃ = [x; 1]
    out = {"full": LAYERS * sum(sym(n) for n in ins) * value_bytes}
    for block in (128, 512):
        out[f"block_diagonal_{block}"] = LAYERS * sum((n // block) * sym(block) + sym(n % block) + n
                                                      for n in ins) * value_bytes
    for rank in (64, 256):
        out[f"low_rank_{rank}"] = LAYERS * sum(n * rank + rank + n for n in ins) * value_bytes
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "refit" / "statistics_size.json"))
    args = ap.parse_args()
    checkpoint = CHECKPOINT_PARAMS * 2
    rows = []
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        for name, b in forms(nbytes).items():
            rows.append({"form": name, "dtype": dtype, "bytes": b, "fraction_of_checkpoint": b / checkpoint})
    windows = WINDOWS[0] * WINDOWS[1] * (4 + 1)  # int32 ids + uint8 mask
    rows.append({"form": "calibration_windows", "dtype": "int32+uint8", "bytes": windows,
                 "fraction_of_checkpoint": windows / checkpoint})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"shape": {"layers": LAYERS, "hidden": HIDDEN, "intermediate": INTER},
                                          "checkpoint_bytes_bf16": checkpoint, "forms": rows}, indent=2) + "\n")
    for r in rows:
        print(f"{r['form']:>22} {r['dtype']:>11} {r['bytes'] / 2**30:9.3f} GiB  {100 * r['fraction_of_checkpoint']:7.3f}%")


if __name__ == "__main__":
    main()
