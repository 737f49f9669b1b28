"""Scoring-pass throughput on one GPU: gisp-deploy's objective gradient vs plain `loss.backward()`.

    PYTHONPATH=. python bench/gpu_scoring.py --out DIR [--layers 32] [--batch-sizes 2,16]

Random-weight Llama-2-7B-shaped model in bf16. Reports tokens/s, model-FLOPs utilisation (6·N·tokens, N =
non-embedding parameters plus lm_head; peak given by --peak-tflops, H200 bf16 dense = 989), peak memory, and
the projected wall time of the reference schedule (112 steps x 2000 x 256 tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gisp_deploy.data import Calibration
from gisp_deploy.families import ModelShape
from gisp_deploy.objectives import objective_gradient, scored_weights
from gisp_deploy.scoring import gradient_scores, normalize


def model_7b(layers: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    return model.eval(), cfg


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-sizes", default="2,16")
    ap.add_argument("--samples", type=int, default=32, help="sequences per timed pass")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    model, cfg = model_7b(args.layers, dev)
    shape = ModelShape.from_config(cfg)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    results = []
    T = args.seq_len
    ids = torch.randint(0, cfg.vocab_size, (args.samples, T))
    ones = torch.ones_like(ids)
    calib = Calibration(ids, ones, ones, torch.full((args.samples,), 1 / args.samples, dtype=torch.float64), "lm", ())
    weights = scored_weights(model, shape, "q_head")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        torch.cuda.reset_peak_memory_stats()
        grads = {}

        def ours():
            grads.clear()
            grads.update(objective_gradient(model, weights, calib, bs))

        t_ours = timed(ours, 2)
        mem_ours = torch.cuda.max_memory_allocated()
        t_score = timed(lambda: normalize(*gradient_scores(model, shape, "q_head", grads), shape, "q_head",
                                          "reference"), 2)
        grads.clear()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for p in model.parameters():
            p.requires_grad_(True)

        def plain():
            for i in range(0, args.samples, bs):
                x = ids[i:i + bs].to(dev)
                model(input_ids=x, labels=x).loss.backward()
            model.zero_grad(set_to_none=True)

        t_plain = timed(plain, 2)
        mem_plain = torch.cuda.max_memory_allocated()
        for p in model.parameters():
            p.requires_grad_(False)
        tokens = args.samples * T
        for name, t, mem in (("gisp-deploy objective_gradient", t_ours, mem_ours), ("plain loss.backward", t_plain, mem_plain)):
            tps = tokens / t
            results.append({"impl": name, "batch": bs, "seq_len": T, "tokens_per_s": round(tps),
                            "mfu": round(6 * n_params * tps / (args.peak_tflops * 1e12), 4),
                            "peak_mem_gb": round(mem / 1e9, 1),
                            "reference_schedule_h": round(112 * 2000 * 256 / tps / 3600, 2)})
            print(results[-1], flush=True)
        results.append({"impl": "score aggregation (|W·G|, per structure, normalised)", "batch": bs,
                        "seconds_per_step": round(t_score, 4)})
        print(results[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_scoring.json").write_text(json.dumps({
        "command": "PYTHONPATH=. python bench/gpu_scoring.py", "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "layers": args.layers, "params_counted": n_params, "results": results}, indent=2))


if __name__ == "__main__":
    main()
