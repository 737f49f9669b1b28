"""Size of the ranking format per structure, and what it makes for Llama-2-7B / Llama-3-70B shapes.

    python bench/ranking_size.py [--out bench/results/ranking_size.json]

Writes a real ranking (random order) for each shape with the same code `prune` uses and measures the file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from gisp_deploy.families import ModelShape
from gisp_deploy.ranking import CHANNEL, HEAD, build_ranking

SHAPES = {
    "Llama-2-7B": dict(num_layers=32, hidden=4096, num_heads=32, num_kv_heads=32, head_dim=128, intermediate=11008,
                       checkpoint_bytes=13_476_839_424),
    "Llama-3-8B": dict(num_layers=32, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336,
                       checkpoint_bytes=16_060_522_496),
    "Llama-3-70B": dict(num_layers=80, hidden=8192, num_heads=64, num_kv_heads=8, head_dim=128, intermediate=28672,
                        checkpoint_bytes=141_107_412_992),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/ranking_size.json")
    args = ap.parse_args()
    rows = []
    rng = np.random.default_rng(0)
    for name, s in SHAPES.items():
        ckpt = s.pop("checkpoint_bytes")
        shape = ModelShape(family="llama", q_bias=False, kv_bias=False, o_bias=False, mlp_bias=False, **s)
        keys = [(l, HEAD, h) for l in range(shape.num_layers) for h in range(shape.num_heads)]
        keys += [(l, CHANNEL, c) for l in range(shape.num_layers) for c in range(shape.intermediate)]
        order = rng.permutation(len(keys))
        covered = int(0.7 * len(keys))
        removed = [(*keys[j], 1 + k * 112 // covered, float(rng.random())) for k, j in enumerate(order[:covered])]
        final = {keys[j]: float(rng.random()) for j in order[covered:]}
        ranking = build_ranking(shape, "q_head", removed, final)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "ranking.safetensors"
            ranking.save(path)
            size = path.stat().st_size
        rows.append({"model": name, "structures": len(ranking), "ranking_bytes": size,
                     "bytes_per_structure": round(size / len(ranking), 2), "checkpoint_bytes_bf16": ckpt,
                     "fraction_of_checkpoint": size / ckpt})
        print(f"{name}: {len(ranking)} structures, ranking {size / 1e6:.2f} MB = {size / len(ranking):.2f} B/structure, "
              f"{100 * size / ckpt:.4f}% of the {ckpt / 1e9:.1f} GB bf16 checkpoint")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python bench/ranking_size.py", "results": rows}, indent=2))


if __name__ == "__main__":
    main()
