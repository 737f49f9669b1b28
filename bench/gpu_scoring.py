"""GISP scoring-pass throughput on one GPU, and the projected wall time of the reference schedule.

    PYTHONPATH=. python bench/gpu_scoring.py --out DIR                 # H200: Llama-2-7B shape, bf16
    PYTHONPATH=. python bench/gpu_scoring.py --out DIR --device cpu --layers 4 --hidden 256 --intermediate 688 \
        --heads 4 --vocab 2048 --samples 4 --seq-len 64 --dtype float32   # smoke test of the script itself

Random-weight Llama in one run, all passes over the same `--samples` x `--seq-len` tokens:
- plain transformers `loss.backward()` (every weight trainable) at the reference batch (2) and at 16;
- gisp-deploy's scoring pass (`objective_gradient`: gradients only for the scored weights, fp32 sums in the
  backward hooks) on the dense model with every layer scored, as `--compute masked` runs every pass, at the
  reference batch, 16 and the micro-batch `fit_batch_size` picks;
- the passes of a `--compute compact` run: on the shrinking model (shrinking.py) starting after the leading
  protected layers (objectives.LeadingCache), at sparsity 0 and after a share of the unprotected layers'
  parameters was cut out, at 0.175 / 0.35 / 0.525 / 0.7 (ragged widths, channels padded to 64, as a run
  leaves them).
MFU counts 6 x (parameters of the dense model, with lm_head, without the embedding) x tokens for every pass, so
a compact pass above 100% of the dense work means "as fast as if the GPU did the dense work at that rate".
Agreement: at the middle sparsity, the compact pass's per-structure scores against the masked pass's (a copy of
the dense model with the same structures zeroed by methods.Remover, as --compute masked does; every layer run),
both at one micro-batch: relative differences of the scores, and how many of the structures the next step would
remove (the lowest-scoring 0.7/112 of the pool, normalised as the reference does) both passes pick.
Projection: the reference schedule is 112 passes over 2000 x 256 tokens; pass k sees the removals of the k-1
passes before it, i.e. sparsity 0.7 (k-1)/112 (linear), timed by interpolating the measured points; the first
pass runs every layer (it records the leading layers' outputs), and the run ends with one pass for the
protected layers' scores (structures schedule), timed as a dense pass.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from gisp_deploy.data import Calibration
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.methods import PruneConfig, PruneState, Removal, Remover
from gisp_deploy.pruning.objectives import LeadingCache, fit_batch_size, objective_gradient
from gisp_deploy.pruning.scoring import normalize, scores_kv
from gisp_deploy.pruning.shrinking import ShrinkingModel
from gisp_deploy.ranking import CHANNEL, HEAD

REFERENCE = {"steps": 112, "samples": 2000, "seq_len": 256, "final_sparsity": 0.7}


def build_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=4096)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config._attn_implementation = "sdpa"
    return model.eval(), cfg


def removal_at(shape: ModelShape, sparsity: float, unprotected: list[int], seed: int = 0):
    """Heads and channels of the unprotected layers removed at random until `sparsity` of all decoder
    parameters is gone, each layer a different amount (ragged, as GISP leaves them)."""
    gen = np.random.default_rng(seed)
    share = sparsity * shape.num_layers / len(unprotected)  # the protected layers keep everything
    removed = []
    for layer in unprotected:
        frac = float(np.clip(share * gen.uniform(0.8, 1.2), 0, 0.95))
        heads = gen.permutation(shape.num_heads)[: int(round(frac * shape.num_heads))]
        channels = gen.permutation(shape.intermediate)[: int(round(frac * shape.intermediate))]
        removed += [(layer, HEAD, int(h)) for h in heads] + [(layer, CHANNEL, int(c)) for c in channels]
    return removed


def agreement(compact: tuple, masked: tuple, removed, shape: ModelShape, unprotected: list[int]) -> dict:
    """How far the compact pass's scores are from the masked pass's, over the structures still in the pool."""
    in_pool = [np.zeros((shape.num_layers, shape.num_heads), bool), np.zeros((shape.num_layers, shape.intermediate), bool)]
    for m in in_pool:
        m[unprotected] = True
    for layer, kind, index in removed:
        in_pool[0 if kind == HEAD else 1][layer, index] = False
    a, b = (np.concatenate([h.numpy()[in_pool[0]], c.numpy()[in_pool[1]]])
            for h, c in (normalize(*scores, shape, "q_head", "reference") for scores in (compact, masked)))
    rel = np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-30)
    k = max(1, round(len(a) * REFERENCE["final_sparsity"] / REFERENCE["steps"]))
    pick_a, pick_b = set(np.argsort(a, kind="stable")[:k]), set(np.argsort(b, kind="stable")[:k])
    return {"structures_in_pool": len(a), "rel_diff_median": float(np.median(rel)),
            "rel_diff_p99": float(np.quantile(rel, 0.99)), "rel_diff_max": float(rel.max()),
            "next_step_removals": k, "next_step_same_picks": len(pick_a & pick_b),
            "order_identical": bool((np.argsort(a, kind="stable") == np.argsort(b, kind="stable")).all())}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps, device):
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    return round(torch.cuda.max_memory_allocated() / 1e9, 1) if device.type == "cuda" else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=64, help="sequences per timed pass")
    ap.add_argument("--sparsities", default="0.175,0.35,0.525,0.7")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H200 dense bf16")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    dense, cfg = build_model(args, dev, dtype)
    shape = ModelShape.from_config(cfg)
    n_params = sum(p.numel() for n, p in dense.named_parameters() if "embed_tokens" not in n)
    T, N = args.seq_len, args.samples
    ids = torch.randint(0, cfg.vocab_size, (N, T))
    ones = torch.ones_like(ids)
    calib = Calibration(ids, ones, ones, torch.full((N,), 1 / N, dtype=torch.float64), "lm", ())
    tokens = N * T
    unprotected = [l for l in range(shape.num_layers) if l not in PruneConfig().protected_layers(shape.num_layers)]
    with_kv = scores_kv(shape, "q_head")
    results = []

    def record(impl, batch, seconds, sparsity=0.0, **extra):
        tps = tokens / seconds
        row = {"impl": impl, "sparsity": sparsity, "batch": batch, "seq_len": T, "seconds_per_pass": round(seconds, 4),
               "tokens_per_s": round(tps), "mfu_dense_equivalent": round(6 * n_params * tps / (args.peak_tflops * 1e12), 4),
               "peak_mem_gb": peak_gb(dev), **extra}
        results.append(row)
        print(json.dumps(row), flush=True)

    # plain transformers: every weight trainable, the loss HF computes
    for bs in (2, 16):
        peak_reset(dev)
        dense.requires_grad_(True)

        def plain():
            for i in range(0, N, bs):
                x = ids[i:i + bs].to(dev)
                dense(input_ids=x, labels=x).loss.backward()
            dense.zero_grad(set_to_none=True)

        record("plain loss.backward", bs, timed(plain, args.reps, dev))
    dense.requires_grad_(False)

    shrinking = ShrinkingModel(dense, shape, "q_head", 64)
    weights = shrinking.weights(range(shape.num_layers), with_kv)  # every layer: a --compute masked pass
    fitted = fit_batch_size(dense, weights, calib)
    for bs in sorted({2, 16, fitted}):
        peak_reset(dev)
        record("gisp-deploy scoring pass (masked, all layers)", bs, timed(
            lambda: objective_gradient(dense, weights, calib, bs), args.reps, dev), fitted=bs == fitted)
    grads = objective_gradient(dense, weights, calib, fitted)
    t_agg = timed(lambda: normalize(*shrinking.scores(grads, unprotected, with_kv), shape, "q_head", "reference"),
                  args.reps, dev)
    del grads

    leading = LeadingCache(min(l for l in range(shape.num_layers + 1) if l not in set(unprotected)))
    objective_gradient(dense, shrinking.weights(unprotected, with_kv), calib, fitted, leading=leading)  # records
    points = []
    sparsities = [0.0] + [float(x) for x in args.sparsities.split(",")]
    check_at = sparsities[len(sparsities) // 2]
    check_batch = min(fitted, 8)  # beside two model copies and their fp32 sums
    for s in sparsities:
        model = copy.deepcopy(dense) if s else dense
        sm = ShrinkingModel(model, shape, "q_head", 64)
        removed = removal_at(shape, s, unprotected)
        t_cut = time.perf_counter()
        sm.cut(removed)
        sync(dev)
        t_cut = time.perf_counter() - t_cut
        kept = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
        w = sm.weights(unprotected, with_kv)
        peak_reset(dev)
        seconds = timed(lambda: objective_gradient(model, w, calib, fitted, leading=leading), args.reps, dev)
        record("gisp-deploy scoring pass (compact, leading layers cached)", fitted, seconds, sparsity=s,
               params_kept_fraction=round(kept / n_params, 4), cut_seconds=round(t_cut, 3))
        points.append((s, seconds))
        if s == check_at:
            grads = objective_gradient(model, w, calib, check_batch, leading=leading)
            compact_scores = sm.scores(grads, unprotected, with_kv)
            check_removed = removed
            del grads
        del model, sm, w
    masked = copy.deepcopy(dense)
    Remover(masked, shape, "q_head", PruneState(removed=[Removal(*r, 0, 0.0) for r in check_removed]))  # zeroes them
    grads = objective_gradient(masked, ShrinkingModel(masked, shape, "q_head", 64).weights(range(shape.num_layers), with_kv),
                               calib, check_batch)
    masked_scores = ShrinkingModel(masked, shape, "q_head", 64).scores(grads, unprotected, with_kv)
    del grads, masked
    agree = {"sparsity": check_at, "batch": check_batch,
             **agreement(compact_scores, masked_scores, check_removed, shape, unprotected)}
    print(json.dumps({"agreement_compact_vs_masked": agree}), flush=True)
    xs, ys = zip(*points)
    ref = REFERENCE
    per_pass_tokens = ref["samples"] * ref["seq_len"]
    scale = per_pass_tokens / tokens
    t_full = next(r["seconds_per_pass"] for r in results if "masked" in r["impl"] and r["batch"] == fitted)
    sched = [ref["final_sparsity"] * k / ref["steps"] for k in range(1, ref["steps"])]
    compact_h = (2 * t_full * scale + sum(float(np.interp(s, xs, ys)) * scale for s in sched)
                 + ref["steps"] * t_agg) / 3600
    dense_h = ref["steps"] * (t_full * scale + t_agg) / 3600
    plain_ref = next(r for r in results if r["impl"] == "plain loss.backward" and r["batch"] == 2)
    plain_h = ref["steps"] * plain_ref["seconds_per_pass"] * scale / 3600
    projection = {"reference_schedule": ref, "plain_batch2_h": round(plain_h, 3),
                  "scoring_masked_fitted_batch_h": round(dense_h, 3), "scoring_compact_fitted_batch_h": round(compact_h, 3),
                  "speedup_vs_plain_batch2": round(plain_h / compact_h, 2), "aggregation_seconds_per_step": round(t_agg, 4),
                  "fitted_batch": fitted}
    print(json.dumps(projection), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_scoring.json").write_text(json.dumps({
        "command": "PYTHONPATH=. python bench/gpu_scoring.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
        "dtype": args.dtype, "params_counted": n_params, "tokens_per_pass": tokens, "results": results,
        "projection": projection, "agreement_compact_vs_masked": agree}, indent=2))


if __name__ == "__main__":
    main()
