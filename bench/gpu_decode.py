"""Decode speed of compact slices vs the dense model on the transformers path (one H200).

    PYTHONPATH=. python bench/gpu_decode.py --out DIR [--work /tmp/gisp-7b] [--layers 32] [--batch-sizes 1,16]
    PYTHONPATH=. python bench/gpu_decode.py --out DIR --artifact bench/results/methods/artifact-gisp --device cpu

A static KV cache makes every decode step the same graph, which `generate` compiles (torch.compile,
CUDA graphs) on CUDA, so a step costs its weight and KV reads rather than Python overhead. Per model and
batch size: B random prompts, greedy, `min_new_tokens` = `max_new_tokens` = N; time per output token =
(wall(N) - wall(1)) / (N - 1), medians of 3 after two warm-up runs (compilation). The dense model is
transformers' own LlamaForCausalLM; slices are gisp_deploy.load. The ideal speed-up is the ratio of bytes a
step reads (gisp_deploy.budget.decode_bytes). Without --artifact a Llama-2-7B-shaped random checkpoint is
written once (bench/gpu_load.py's).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, ids, n, device) -> float:
    sync(device)
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, cache_implementation="static", pad_token_id=0)
    sync(device)
    assert out.shape[1] == ids.shape[1] + n, out.shape
    return time.perf_counter() - t


def decode_speed(model, batch: int, prompt_len: int, new_tokens: int, device, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(16, vocab - 16, (batch, prompt_len), generator=gen).to(device)
    for _ in range(2):
        timed_generate(model, ids, new_tokens, device)
    first = statistics.median(timed_generate(model, ids, 1, device) for _ in range(3))
    full = statistics.median(timed_generate(model, ids, new_tokens, device) for _ in range(3))
    tpot = (full - first) / (new_tokens - 1)
    return {"batch_size": batch, "ttft_s": first, "tpot_s": tpot, "total_s": full,
            "output_tokens_per_s": batch * new_tokens / full}


def main():
    from gisp_deploy.artifact import load_artifact
    from gisp_deploy.budget import decode_bytes, weight_read_params
    from gisp_deploy.slicing.loader import load
    from gisp_deploy.serving.summary import slice_summary

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--artifact", help="an existing artifact (default: write a 7B-shaped random one)")
    ap.add_argument("--work", default="/tmp/gisp-7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sparsities", default="0.2,0.4,0.5")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.artifact:
        art = load_artifact(args.artifact)
    else:
        from gpu_load import make_checkpoint

        art = load_artifact(make_checkpoint(Path(args.work), args.layers))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    vocab = art.config.vocab_size
    context = args.prompt_len + args.new_tokens / 2
    rows = []
    for s in [0.0] + [float(x) for x in args.sparsities.split(",")]:
        if s == 0:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(art.weights_dir, dtype=torch.bfloat16).to(device)
        else:
            model = load(art, s, device=device, dtype=torch.bfloat16)
        model.eval()
        summ = slice_summary(art.path, s, dtype="bfloat16")
        read = weight_read_params(summ.parameters, art.config)
        for b in batches:
            try:
                r = decode_speed(model, b, args.prompt_len, args.new_tokens, device, vocab)
            except Exception as e:  # record and go on: one failing model must not lose the others' numbers
                r = {"batch_size": b, "error": f"{type(e).__name__}: {e}"[:2000]}
            r.update(sparsity=s, parameters=summ.parameters, kv_bytes_per_token=summ.kv_bytes_per_token,
                     bytes_per_step=decode_bytes(read * 2, summ.kv_bytes_per_token, b, context),
                     loader="transformers dense" if s == 0 else "gisp_deploy.load")
            rows.append(r)
            print(json.dumps(r), flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        base = next(d for d in rows if d["sparsity"] == 0 and d["batch_size"] == r["batch_size"])
        if "tpot_s" in r and "tpot_s" in base:
            r["speedup"] = base["tpot_s"] / r["tpot_s"]
            r["ideal_speedup"] = base["bytes_per_step"] / r["bytes_per_step"]
            r["fraction_of_ideal"] = r["speedup"] / r["ideal_speedup"]
            if device.type == "cuda":
                r["weight_bandwidth_gb_s"] = r["bytes_per_step"] / r["tpot_s"] / 1e9
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_decode.json").write_text(json.dumps(
        {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "device": str(device),
         "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "prompt_len": args.prompt_len,
         "new_tokens": args.new_tokens, "results": rows}, indent=2))
    for r in rows:
        if "speedup" in r:
            print(f"s={r['sparsity']:<4} batch {r['batch_size']:>3}: {r['tpot_s'] * 1e3:7.2f} ms/token, speed-up "
                  f"{r['speedup']:.3f} of ideal {r['ideal_speedup']:.3f} ({r['fraction_of_ideal']:.2f})")


if __name__ == "__main__":
    main()
