"""What an `ls` refit loses when it is given a compressed form of its statistics instead of the calibration windows.

    python bench/refit_statistics.py ARTIFACT [--sparsities 0.4,0.5] [--max-tokens 65536]
        [--forms full,block_64,block_128,block_256,low_rank_16,low_rank_64,low_rank_256,diagonal]
        [--out bench/results/refit/statistics.json]

`--refit ls` needs, per layer, the dense inputs' moments M = E[x̃x̃ᵀ] (x̃ = [x; 1]) of o_proj (H + 1) and
down_proj (I + 1). gisp-deploy stores the calibration windows (160 KB) and recomputes M at load time. This script
computes M once from the artifact's windows (the dense model through transformers, forward pre-hooks on every
o_proj / down_proj, fp64 sums over the real tokens), then gives the refit each stored form instead:

  full          M itself (what the windows give)
  block_b       the mean μ exact, the centred covariance C = M − μμᵀ kept in b × b diagonal blocks of consecutive
                inputs (o_proj: head-major rows, so b = head_dim is one block per head; down_proj: channel groups,
                in the artifact's channel order; a rank-ordered artifact groups channels of similar rank)
  low_rank_r    μ, C's top-r eigenpairs and the exact diagonal of C (C ≈ U Λ Uᵀ + diag(C − U Λ Uᵀ))
  diagonal      μ and C's diagonal (input energies only)

Each slice is loaded with --refit ls (so it has the corrected layers' biases), and its o_proj / down_proj are
refitted again from each form with refit.least_squares and the default ridge, then measured: held-out ppl@128 on
the first --max-tokens tokens of both held-out texts, as `eval` measures it. The `full` form must reproduce the
`ls` load (a check of this script). Bytes: what the form stores for the whole model (symmetric: upper triangle)
at 2 bytes a value (bf16), and as a fraction of the reference model's bf16 checkpoint; the same forms for a
Llama-2-7B: bench/results/refit/statistics_size.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEXTS = [SHARED / "data" / "heldout" / "persuasion.txt.gz", SHARED / "data" / "heldout" / "treasury_of_david_tail.txt.gz"]
FORMS = "full,block_64,block_128,block_256,low_rank_16,low_rank_64,low_rank_256,diagonal"
BATCH = 16


def dense_moments(art) -> list[dict]:
    """(the dense model, per layer {proj: M [in + 1, in + 1] fp64} over the artifact's calibration windows)."""
    import torch

    from gisp_deploy.hf import load_model
    from gisp_deploy.refit import Moments

    dense = load_model(art.weights_dir, torch.device("cpu"), torch.float32,
                       links_may_leave=not art.manifest["weights"]["copied"])
    ids, mask = art.statistics()
    sums = [{"o_proj": Moments(), "down_proj": Moments()} for _ in dense.model.layers]
    current = {}
    hooks = []
    for block, s in zip(dense.model.layers, sums):
        for proj, lin in (("o_proj", block.self_attn.o_proj), ("down_proj", block.mlp.down_proj)):
            hooks.append(lin.register_forward_pre_hook(
                lambda _m, args, m=s[proj]: m.add(args[0][current["mask"]])))  # real tokens only
    with torch.no_grad():
        for i in range(0, ids.shape[0], BATCH):
            current["mask"] = mask[i:i + BATCH]
            dense(input_ids=ids[i:i + BATCH], attention_mask=mask[i:i + BATCH].long())
    for h in hooks:
        h.remove()
    return dense, [{p: m.mean() for p, m in s.items()} for s in sums]


def stored(m, form: str):
    """(the moments the refit is given, values stored) for one layer's M [n + 1, n + 1] in `form`."""
    import torch

    n = m.shape[0] - 1
    mu = m[:n, n]  # [n]
    cov = m[:n, :n] - torch.outer(mu, mu)  # [n, n]
    if form == "full":
        return m, (n + 1) * (n + 2) // 2
    if form.startswith("block_"):
        b = int(form.split("_")[1])
        approx = torch.zeros_like(cov)
        for i in range(0, n, b):
            approx[i:i + b, i:i + b] = cov[i:i + b, i:i + b]
        values = sum(k * (k + 1) // 2 for k in (min(b, n - i) for i in range(0, n, b))) + n
    elif form.startswith("low_rank_"):
        r = min(int(form.split("_")[2]), n)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        u, lam = evecs[:, -r:], evals[-r:]  # [n, r], [r]
        approx = (u * lam) @ u.T
        approx += torch.diag(cov.diagonal() - approx.diagonal())
        values = r * n + r + 2 * n
    elif form == "diagonal":
        approx, values = torch.diag(cov.diagonal()), 2 * n
    else:
        raise SystemExit(f"error: unknown form {form!r}; choose from {FORMS}")
    out = m.clone()
    out[:n, :n] = approx + torch.outer(mu, mu)
    return out, values


def refit_from(model, dense, plan, moments: list[dict], form: str) -> int:
    """Refit every o_proj / down_proj of the loaded ls slice `model` from `form` of the moments; values stored."""
    import torch

    from gisp_deploy.layout import consumer_inputs
    from gisp_deploy.modeling import plan_layouts
    from gisp_deploy.refit import least_squares

    values = 0
    with torch.no_grad():
        for layer, lay in enumerate(plan_layouts(plan)):
            inputs = consumer_inputs(lay, plan.shape.head_dim)
            for proj in ("o_proj", "down_proj"):
                src = dense.model.layers[layer].self_attn.o_proj if proj == "o_proj" else dense.model.layers[layer].mlp.down_proj
                block = model.model.layers[layer]
                lin = block.self_attn.o_proj if proj == "o_proj" else block.mlp.down_proj
                m, v = stored(moments[layer][proj], form)
                values += v
                k, pos = inputs[proj]
                w, b = least_squares(src.weight, k, m, bias=src.bias)
                if hasattr(lin, "weight"):  # a layer that lost every input keeps only its bias
                    lin.weight.index_copy_(1, torch.tensor(pos, dtype=torch.long), w.to(lin.weight))
                lin.bias.copy_(b.to(lin.bias))
    return values


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--sparsities", default="0.4,0.5")
    ap.add_argument("--forms", default=FORMS)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "refit" / "statistics.json"))
    args = ap.parse_args()
    forms = args.forms.split(",")
    for f in forms:
        if f not in FORMS.split(",") and not (f.startswith(("block_", "low_rank_")) and f.split("_")[-1].isdigit()):
            raise SystemExit(f"error: unknown form {f!r}; choose from {FORMS} (any block_B / low_rank_R)")
    import torch

    from gisp_deploy.artifact import load_artifact
    from gisp_deploy.hf import load_tokenizer
    from gisp_deploy.plan import plan_slice
    from gisp_deploy.quality.evaluate import measure_quality, text_streams
    from gisp_deploy.slicing.loader import load

    torch.set_num_threads(args.threads)
    art = load_artifact(args.artifact)
    if art.statistics() is None:
        raise SystemExit(f"error: {art.path} records no calibration windows; prune it again with this gisp-deploy")
    tok = load_tokenizer(art.path)
    streams = text_streams(tok, [str(t) for t in TEXTS], args.max_tokens)
    t0 = time.perf_counter()
    dense, moments = dense_moments(art)
    print(f"moments of {len(moments)} layers in {time.perf_counter() - t0:.1f} s", flush=True)
    checkpoint_bytes = 2 * sum(p.numel() for p in dense.parameters())  # bf16
    records, out = [], Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def measure(model, s, variant, values=None):
        for r in measure_quality(model, tok, streams, (128,)):
            rec = {"sparsity": s, "form": variant, **r}
            if values is not None:
                rec |= {"stored_bytes_bf16": 2 * values, "fraction_of_checkpoint": 2 * values / checkpoint_bytes}
            records.append(rec)
            print(json.dumps(rec), flush=True)

    for s in (float(x) for x in args.sparsities.split(",")):
        plan = plan_slice(art.ranking, s)
        measure(load(art, s), s, "none (plain slice)")
        model = load(art, s, refit="ls")
        measure(model, s, "ls load (windows)")
        for form in forms:
            measure(model, s, form, refit_from(model, dense, plan, moments, form))
        out.write_text(json.dumps({
            "command": shlex.join(["python", "bench/refit_statistics.py", *sys.argv[1:]]),
            "artifact": str(art.path), "checkpoint_bytes_bf16": checkpoint_bytes,
            "calibration": {"samples": int(art.statistics()[0].shape[0]), "seq_len": int(art.statistics()[0].shape[1])},
            "torch_threads": args.threads, "results": records}, indent=2) + "\n")
    ok = [r for r in records if r["form"] == "full"]
    ref = {(r["sparsity"], r["text"]): r["perplexity"] for r in records if r["form"] == "ls load (windows)"}
    worst = max(abs(r["perplexity"] / ref[(r["sparsity"], r["text"])] - 1) for r in ok) if ok else 0.0
    print(f"full form vs the ls load: largest relative difference {worst:.2e}"
          + ("  WARNING: the full form should reproduce the ls load" if worst > 1e-3 else ""))


if __name__ == "__main__":
    main()
