"""Load time and peak host memory of compact slices on CPU, against transformers loading the dense model.

    python bench/load_cpu.py [--out bench/results/load_cpu.json] [--work /tmp/gisp-load-bench]

Two sources: the reference model's GISP artifact (bench/results/methods/artifact-gisp, made by
bench/methods_table.py) and a locally written random-weight Llama checkpoint of about 1.5B parameters
(bf16, 4 shards) with a random-method ranking. Every measurement runs in a fresh process; peak RSS is
the process's VmHWM (reset right before loading) minus its RSS then, taken after one forward pass so
that lazily memory-mapped weights are resident too (RssFile counts those mapped file pages). Files are
read from a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, time
import torch
from gisp_deploy.slicing.loader import load
from gisp_deploy.artifact import load_artifact
from transformers import AutoModelForCausalLM
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
mode, path, s = sys.argv[1], sys.argv[2], float(sys.argv[3])
dtype = getattr(torch, sys.argv[4])
art = load_artifact(path)
base = status_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
    f.write("5")
t = time.perf_counter()
if mode == "dense":
    model = AutoModelForCausalLM.from_pretrained(art.weights_dir, dtype=dtype)
else:
    model = load(art, s, dtype=dtype)
wall = time.perf_counter() - t
# lazily mmapped tensors count once touched: run one forward so every weight is resident, as in use
with torch.no_grad():
    model(torch.zeros(1, 8, dtype=torch.long))
ready = time.perf_counter() - t
params = sum(p.numel() for p in model.parameters())
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"wall_s": wall, "ready_s": ready, "peak_rss_mb": status_mb("VmHWM") - base,
                  "rss_after_mb": status_mb("VmRSS") - base,
                  "rss_anon_mb": status_mb("RssAnon"), "rss_file_mb": status_mb("RssFile"),
                  "model_mb": nbytes / 2**20, "params": params}))
"""


def make_random_checkpoint(work: Path) -> Path:
    """~1.5B-parameter Llama (GQA) with random bf16 weights, written shard by shard, plus a random ranking."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from gisp_deploy.artifact import load_artifact, write_artifact
    from gisp_deploy.families import ModelShape
    from gisp_deploy.pruning.methods import PruneConfig, prune

    art = work / "random-1.5b-artifact"
    if art.exists():
        return art
    src = work / "random-1.5b"
    src.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=128, vocab_size=8192, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(src)
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (8192, 2048), "model.norm.weight": (2048,), "lm_head.weight": (8192, 2048)}
    for i in range(24):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (2048, 2048), p + "self_attn.k_proj.weight": (512, 2048),
                       p + "self_attn.v_proj.weight": (512, 2048), p + "self_attn.o_proj.weight": (2048, 2048),
                       p + "mlp.gate_proj.weight": (8192, 2048), p + "mlp.up_proj.weight": (8192, 2048),
                       p + "mlp.down_proj.weight": (2048, 8192), p + "input_layernorm.weight": (2048,),
                       p + "post_attention_layernorm.weight": (2048,)})
    names = list(shapes)
    shards = [names[k::4] for k in range(4)]
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-00004.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) if len(shapes[n]) == 2
                   else torch.ones(shapes[n], dtype=torch.bfloat16) for n in shard}
        total += sum(t.numel() for t in tensors.values())
        save_file(tensors, str(src / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        del tensors
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_parameters": total},
                                                                  "weight_map": weight_map}))
    shape = ModelShape.from_config(cfg)
    ranking = prune(None, shape, None, PruneConfig(method="random", max_sparsity=0.6, protect_first=0, protect_last=0))
    write_artifact(art, src, ranking, {"method": "random"}, copy_weights=False)
    load_artifact(art)
    return art


def probe(mode: str, art: Path, s: float, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(art), str(s), dtype],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"probe {mode} {art} {s} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load_cpu.json"))
    ap.add_argument("--work", default="/tmp/gisp-load-bench")
    ap.add_argument("--reference", default=str(ROOT / "bench" / "results" / "methods" / "artifact-gisp"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sources = [("tiny-llama-gqa-19m (gisp)", Path(args.reference), "float32"),
               ("random Llama 1.5B (bf16)", make_random_checkpoint(work), "bfloat16")]
    rows = []
    for name, art, dtype in sources:
        probe("compact", art, 0.0, dtype)  # warm the page cache
        for mode, s in [("dense", 0.0)] + [("compact", s) for s in (0.0, 0.2, 0.4, 0.5)]:
            r = {"source": name, "loader": "transformers from_pretrained (dense)" if mode == "dense" else "gisp load",
                 "sparsity": s, "dtype": dtype, **probe(mode, art, s, dtype)}
            rows.append(r)
            print(f"{name:26s} {r['loader']:37s} s={s:<4} load {r['wall_s']:6.2f} s, ready {r['ready_s']:6.2f} s, "
                  f"peak +{r['peak_rss_mb']:7.1f} MB, after +{r['rss_after_mb']:7.1f} MB (anon {r['rss_anon_mb']:7.1f}, "
                  f"file {r['rss_file_mb']:7.1f}), "
                  f"model {r['model_mb']:7.1f} MB", flush=True)
    Path(args.out).write_text(json.dumps({"command": "python bench/load_cpu.py", "results": rows}, indent=2))


if __name__ == "__main__":
    main()
