"""Load-to-GPU time of a Llama-2-7B-shaped checkpoint: compact slices (gisp_deploy.load) vs transformers dense.

    PYTHONPATH=. python bench/gpu_load.py --out DIR [--work /tmp/gisp-7b] [--layers 32] [--repeats 3]

Writes a random bf16 checkpoint (4 shards) and a random-method ranking once, plus the same weights with the
ranking renumbered into its own order (the slices of a rank-ordered artifact: row / column prefixes mapped from
the file), then times each case in a fresh process, after one warm-up load that reads every file into the page
cache: transformers `from_pretrained(..., device_map="cuda")` of the dense model; `gisp_deploy.load(artifact, s,
device="cuda")` as it loads by default (a rank-ordered slice cut on the host and its compact tensors uploaded,
a source-order one read whole onto the GPU and gathered there) and with gather="device" (the Triton gathers). The cases run in turns (A B C .. A B C ..), `--repeats` rounds, so every
ratio to dense compares loads timed in the same window; medians, min-max and a warning when repeats disagree.
Wall time is from after CUDA init and the imports to the model's weights on the GPU (synchronized). The first
default 0.4 slice's logits are checked against the oracle on a short probe (after its timing). The JSON is
rewritten after every load, so a run stopped by its time limit keeps what it measured.
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

PROBE = r"""
import json, sys, time, torch
mode, art, s, check, dev = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
cuda = dev == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
from gisp_deploy.artifact import load_artifact
from gisp_deploy.slicing.loader import load
from transformers import AutoModelForCausalLM
a = load_artifact(art)
torch.zeros(1, device=dev)
sync(); t = time.perf_counter()
if mode == "dense":
    m = AutoModelForCausalLM.from_pretrained(a.weights_dir, dtype=torch.bfloat16, device_map=dev)
else:
    m = load(a, s, device=dev, dtype=torch.bfloat16, gather=mode)
sync(); wall = time.perf_counter() - t
out = {"wall_s": round(wall, 3), "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
       "weights_gb": round(sum(p.numel() * p.element_size() for p in m.parameters()) / 1e9, 3)}
if check:
    from gisp_deploy.plan import plan_slice
    from gisp_deploy.slicing.oracle import apply_oracle
    ids = torch.randint(0, 32000, (1, 32), device=dev)
    with torch.no_grad():
        got = m(ids).logits.float()
    del m
    dense = AutoModelForCausalLM.from_pretrained(a.weights_dir, dtype=torch.bfloat16, device_map=dev)
    apply_oracle(dense, plan_slice(a.ranking, s))
    with torch.no_grad():
        want = dense(ids).logits.float()
    out["max_abs_logit_diff_vs_oracle_bf16"] = (got - want).abs().max().item()
    out["greedy_agreement"] = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
print(json.dumps(out))
"""


def make_checkpoint(work: Path, layers: int, device: str) -> Path:
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
        tensors = {n: (torch.randn(shapes[n], device=device, dtype=torch.bfloat16) * 0.02).cpu() if len(shapes[n]) == 2
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


CASES = {  # name: (gather, rank-ordered artifact, sparsity); "dense" is transformers' from_pretrained
    "dense": ("dense", False, 0.0),
    "auto-0.4": ("auto", False, 0.4),  # the default on CUDA: a source-order slice gathered on the device
    "auto-0.4-ranked": ("auto", True, 0.4),  # a rank-ordered one cut on the host, its compact tensors uploaded
    "device-0.4-ranked": ("device", True, 0.4),
    "auto-0.0": ("auto", False, 0.0),
    "auto-0.5-ranked": ("auto", True, 0.5),
    "auto-0.2-ranked": ("auto", True, 0.2),
}


def probe(mode: str, where: Path, s: float, device: str, check: bool = False) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, mode, str(where), str(s), "1" if check else "0", device],
                         capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        return {"error": res.stderr[-1500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(out: str, work: str = "/tmp/gisp-7b", layers: int = 32, repeats: int = 3, cases: list[str] | None = None,
         device: str = "cuda"):
    t = time.perf_counter()
    art = make_checkpoint(Path(work), layers, device)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f} s", flush=True)
    ranked = art.parent / "artifact-ranked"
    names = cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"error: unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    report = {"command": "PYTHONPATH=. python bench/gpu_load.py " + " ".join(sys.argv[1:]), "layers": layers,
              "repeats": repeats, "warm_up": probe("dense", art, 0.0, device), "summary": {}, "results": []}
    print("warm-up", report["warm_up"], flush=True)
    checked = False
    for r in range(repeats):
        for name in names:
            mode, rank_ordered, s = CASES[name]
            check = mode == "auto" and s == 0.4 and not checked
            row = {"case": name, "round": r, **probe(mode, ranked if rank_ordered else art, s, device, check)}
            checked |= check and "error" not in row
            report["results"].append(row)
            print(row, flush=True)
            report["summary"] = summarize(report["results"], names)
            write(out, report)  # after every load: a run cut short keeps what it measured
    for name, entry in report["summary"].items():
        print(f"{name:16s} {entry}", flush=True)


def summarize(rows: list[dict], names: list[str]) -> dict:
    """Per case: median, min-max of its walls; its ratio to the dense load of the same round (median, min-max)."""
    walls = {n: {row["round"]: row["wall_s"] for row in rows if row["case"] == n and "wall_s" in row} for n in names}
    dense = walls.get("dense", {})
    summary = {}
    for name, by_round in walls.items():
        if not by_round:
            continue
        w = list(by_round.values())
        entry = {"median_s": statistics.median(w), "min_s": min(w), "max_s": max(w), "n": len(w)}
        if max(w) > 1.5 * min(w):
            entry["warning"] = "repeats disagree (max > 1.5 x min)"
        ratios = [by_round[r] / dense[r] for r in by_round if r in dense] if name != "dense" else []
        if ratios:
            entry["ratio_to_dense_median"] = round(statistics.median(ratios), 3)
            entry["ratio_to_dense_min_max"] = [round(min(ratios), 3), round(max(ratios), 3)]
        summary[name] = entry
    return summary


def write(out: str, report: dict) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "gpu_load.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/gisp-7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=None, help=f"comma-separated, of: {', '.join(CASES)} (default: all)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself (use --layers 1)")
    a = ap.parse_args()
    main(a.out, a.work, a.layers, a.repeats, a.cases.split(",") if a.cases else None, a.device)
