"""Which consumer's refit gains what: `--refit ls` on o_proj only (what removed heads feed), down_proj only (what
removed channels feed), and both, on the reference model.

    python bench/refit_parts.py ARTIFACT [--sparsities 0.4,0.5] [--max-tokens 65536] [--out bench/results/refit/parts.json]

ls fits each layer's o_proj and down_proj from the *dense* model's input moments, independently of every other
fit, so the slice corrected in one projection only is the ls slice with the other projection's weights (and
bias) put back as the plain slice has them: exact, from two loads. Held-out perplexity at 128-token windows on the
first --max-tokens tokens of both held-out texts (gisp_deploy.quality.evaluate.measure_quality, as `eval` does).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEXTS = [SHARED / "data" / "heldout" / "persuasion.txt.gz", SHARED / "data" / "heldout" / "treasury_of_david_tail.txt.gz"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--sparsities", default="0.4,0.5")
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "refit" / "parts.json"))
    args = ap.parse_args()
    import torch

    from gisp_deploy.artifact import load_artifact
    from gisp_deploy.hf import load_tokenizer
    from gisp_deploy.quality.evaluate import measure_quality, text_streams
    from gisp_deploy.slicing.loader import load

    torch.set_num_threads(args.threads)
    art = load_artifact(args.artifact)
    tok = load_tokenizer(art.path)
    streams = text_streams(tok, [str(t) for t in TEXTS], args.max_tokens)
    records = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for s in (float(x) for x in args.sparsities.split(",")):
        plain, both = load(art, s), load(art, s, refit="ls")
        variants = {"none": plain, "ls": both}
        for name, revert in (("ls o_proj only", "down_proj"), ("ls down_proj only", "o_proj")):
            model = load(art, s, refit="ls")
            with torch.no_grad():
                for block, ref in zip(model.model.layers, plain.model.layers):
                    lin, ref_lin = (getattr(getattr(b, "self_attn" if revert == "o_proj" else "mlp"), revert)
                                    for b in (block, ref))
                    if hasattr(lin, "weight"):  # a layer that lost every input keeps only its (refitted) bias
                        lin.weight.copy_(ref_lin.weight)
                    lin.bias.zero_()  # the plain slice has no bias here (families with biases: none on o / down)
            variants[name] = model
        for name, model in variants.items():
            for r in measure_quality(model, tok, streams, (128,)):
                records.append({"sparsity": s, "variant": name, **r})
                print(json.dumps(records[-1]), flush=True)
        out.write_text(json.dumps({"command": shlex.join(["python", "bench/refit_parts.py", *sys.argv[1:]]),
                                   "artifact": str(art.path), "results": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
