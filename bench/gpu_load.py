"""Load-to-GPU time of a Llama-2-7B-shaped checkpoint: compact slices (gisp_deploy.load) vs transformers dense.

    PYTHONPATH=. python bench/gpu_load.py --out DIR [--work /tmp/gisp-7b] [--layers 32]

Writes a random bf16 checkpoint (4 shards) and a random-method ranking once, then times, each in a fresh
process after a warm-up read: transformers `from_pretrained(..., device_map="cuda")` of the dense model, and
`gisp_deploy.load(artifact, s, device="cuda")` at s = 0, 0.2, 0.4, 0.5, and the same weights with the ranking
renumbered into its own order (the slices of a rank-ordered artifact: row prefixes copied from the mapped file,
only their bytes) at 0.4, 0.5, 0.2; plus logits of each 0.4 slice against the oracle on a short probe.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, time, torch
mode, art, s = sys.argv[1], sys.argv[2], float(sys.argv[3])
from gisp_deploy.artifact import load_artifact
a = load_artifact(art)
torch.cuda.init(); torch.zeros(1, device="cuda")
torch.cuda.synchronize(); t = time.perf_counter()
if mode == "dense":
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(a.weights_dir, dtype=torch.bfloat16, device_map="cuda")
else:
    from gisp_deploy.slicing.loader import load
    m = load(a, s, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize(); wall = time.perf_counter() - t
out = {"mode": mode, "sparsity": s, "wall_s": round(wall, 3), "gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
       "params_b": round(sum(p.numel() for p in m.parameters()) / 1e9, 3)}
if mode == "compact" and s == 0.4:
    import copy
    from gisp_deploy.plan import plan_slice
    from gisp_deploy.slicing.oracle import apply_oracle
    from transformers import AutoModelForCausalLM
    ids = torch.randint(0, 32000, (1, 32), device="cuda")
    with torch.no_grad():
        got = m(ids).logits.float()
    del m
    dense = AutoModelForCausalLM.from_pretrained(a.weights_dir, dtype=torch.bfloat16, device_map="cuda")
    apply_oracle(dense, plan_slice(a.ranking, s))
    with torch.no_grad():
        want = dense(ids).logits.float()
    out["max_abs_logit_diff_vs_oracle_bf16"] = (got - want).abs().max().item()
    out["greedy_agreement"] = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
print(json.dumps(out))
"""


def make_checkpoint(work: Path, layers: int) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from gisp_deploy.artifact import write_artifact
    from gisp_deploy.families import ModelShape
    from gisp_deploy.pruning.methods import PruneConfig, prune
    from gisp_deploy.rank_order import layer_orders, reordered_ranking

    art = work / "artifact"
    if art.exists():
        return art
    src = work / "dense"
    src.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(src)
    shapes = {"model.embed_tokens.weight": (32000, 4096), "model.norm.weight": (4096,), "lm_head.weight": (32000, 4096)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (4096, 4096)
        shapes.update({p + "mlp.gate_proj.weight": (11008, 4096), p + "mlp.up_proj.weight": (11008, 4096),
                       p + "mlp.down_proj.weight": (4096, 11008), p + "input_layernorm.weight": (4096,),
                       p + "post_attention_layernorm.weight": (4096,)})
    names = list(shapes)
    per = -(-len(names) // 4)
    wmap = {}
    for k in range(4):
        fname = f"model-{k + 1:05d}-of-00004.safetensors"
        chunk = names[k * per:(k + 1) * per]
        tensors = {n: (torch.randn(shapes[n], device="cuda", dtype=torch.bfloat16) * 0.02).cpu() if len(shapes[n]) == 2
                   else torch.ones(shapes[n], dtype=torch.bfloat16) for n in chunk}
        save_file(tensors, str(src / fname), metadata={"format": "pt"})
        wmap.update({n: fname for n in chunk})
        del tensors
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    ranking = prune(None, ModelShape.from_config(cfg), None,
                    PruneConfig(method="random", max_sparsity=0.6, protect_first=0, protect_last=0))
    write_artifact(art, src, ranking, {"method": "random"}, copy_weights=False)
    # the same random weights with the ranking renumbered into its own order: slices as a rank-ordered artifact's
    # (row / column prefixes), without rewriting 13 GB of weights that are random anyway
    write_artifact(work / "artifact-ranked", src, reordered_ranking(ranking, layer_orders(ranking)),
                   {"method": "random"}, copy_weights=False)
    return art


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/gisp-7b")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    art = make_checkpoint(Path(args.work), args.layers)
    rows = []
    ranked = art.parent / "artifact-ranked"
    runs = [("dense", art, 0.0), ("dense", art, 0.0), ("compact", art, 0.0), ("compact", art, 0.2),
            ("compact", art, 0.4), ("compact", ranked, 0.4), ("dense", art, 0.0), ("compact", art, 0.5),
            ("compact", ranked, 0.5), ("compact", ranked, 0.2)]
    for k, (mode, where, s) in enumerate(runs):
        res = subprocess.run([sys.executable, "-c", PROBE, mode, str(where), str(s)], capture_output=True,
                             text=True, cwd=ROOT)
        if res.returncode:
            rows.append({"mode": mode, "sparsity": s, "error": res.stderr[-1500:]})
        else:
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        rows[-1].update(warmup=k == 0, layout="rank-ordered" if where == ranked else "source order")
        print(rows[-1], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_load.json").write_text(json.dumps({"command": "PYTHONPATH=. python bench/gpu_load.py",
                                                              "layers": args.layers, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
