#!/usr/bin/env python
r"""Recover some of the quality a slice lost: LoRA (PEFT) on the slice, merged back into its own weights.

    # an exported slice (gisp-deploy export ... --out llama3-s40)
    python examples/lora_recover.py llama3-s40 --train data/train --heldout heldout.txt --steps 300 \
        --out llama3-s40-lora
    # or an artifact and a sparsity: the slice is exported first, to a temporary directory beside --out
    python examples/lora_recover.py llama3-gisp --sparsity 0.4 --train data/train --heldout heldout.txt \
        --out llama3-s40-lora

A LoRA adapter goes on every q/k/v/o and gate/up/down projection the slice still has (a layer that kept no
query head or no channel has none: its `o_proj` / `down_proj` is only a bias, or nothing), is trained for
`--steps` steps on random `--seq-len`-token windows of the `--train` text (plain torch loop, causal-LM loss,
AdamW, warm-up then cosine decay), and merged (`merge_and_unload`). `--out` is again an exported slice: the
merged weights (save_pretrained, at the input's dtype) and, unchanged, every other file of the input export:
config.json with its per-layer widths and auto_map (plus a `gisp_slice.lora_recovery` record),
modeling_gisp.py, the tokenizer and generation files. It loads as the input did: `import gisp_deploy` and
`AutoModelForCausalLM.from_pretrained(out)`, `gisp-deploy serve out`, or trust_remote_code without gisp-deploy.
Held-out perplexity (non-overlapping `--seq-len` windows, as `gisp-deploy eval`) is printed before and after.

Needs PEFT: pip install 'gisp-deploy[recover]' (make install does).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def lora_targets(model, names=TARGETS) -> list[str]:
    """Full names of the linear layers called one of `names` that have weights: a layer without attention or
    MLP has only a bias (BiasOnly) or nothing where o_proj / down_proj would be, and gets no adapter."""
    import torch.nn as nn

    return [full for full, m in model.named_modules()
            if full.rsplit(".", 1)[-1] in names and isinstance(m, nn.Linear) and m.weight.numel() > 0]


def _check(steps, seq_len, batch_size, lr, rank, alpha, dropout, eval_tokens, targets) -> None:
    if steps < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"need --steps >= 1, --seq-len >= 2 and --batch-size >= 1 (got {steps}, {seq_len}, "
                         f"{batch_size})")
    if not lr > 0 or rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"need --lr > 0, --rank >= 1, --alpha > 0 and 0 <= --dropout < 1 (got {lr}, {rank}, "
                         f"{alpha}, {dropout})")
    if eval_tokens is not None and eval_tokens < seq_len:
        raise ValueError(f"--eval-tokens {eval_tokens} is less than one --seq-len window ({seq_len}); raise it")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"--targets {','.join(targets)}: choose among {','.join(TARGETS)}")


def _windows(stream, seq_len: int, batch_size: int, gen):
    import torch

    starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def main(source, out, *, sparsity: float | None = None, train=(), heldout=(), steps: int = 200, seq_len: int = 128,
         batch_size: int = 8, lr: float = 1e-3, rank: int = 16, alpha: float = 32, dropout: float = 0.05,
         targets=TARGETS, eval_tokens: int | None = 16384, seed: int = 0, overwrite: bool = False,
         log=print) -> dict:
    """LoRA-recover the slice at `source` (an export, or an artifact with `sparsity`) and write it to `out`.
    Returns the held-out perplexities before / after, the training losses and the merged model (in memory)."""
    import gisp_deploy
    from gisp_deploy.output import refuse_destination
    from gisp_deploy.slicing.export import is_export

    source, out = Path(source), Path(out)
    targets = tuple(targets)
    _check(steps, seq_len, batch_size, lr, rank, alpha, dropout, eval_tokens, targets)
    if not train or not heldout:
        raise ValueError("pass --train (text files or folders to train on) and --heldout (text to measure)")
    if not source.is_dir():
        raise ValueError(f"{source}: not a directory; pass an exported slice, or an artifact with --sparsity")
    exported = is_export(source)
    if exported and sparsity is not None:
        raise ValueError(f"{source} is an exported slice (one sparsity already); drop --sparsity")
    if not exported and sparsity is None:
        raise ValueError(f"{source} is not an exported slice; for an artifact pass --sparsity, e.g. --sparsity 0.4")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
    refuse_destination(out, [source], overwrite, "export", is_export)
    try:
        import peft
    except ImportError:
        raise ValueError("this example needs PEFT: pip install 'gisp-deploy[recover]' (or pip install peft)") from None

    if exported:
        return _recover(source, out, peft, train=train, heldout=heldout, steps=steps, seq_len=seq_len,
                        batch_size=batch_size, lr=lr, rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                        eval_tokens=eval_tokens, seed=seed, overwrite=overwrite, log=log)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.slice-", dir=parent) as scratch:
        slice_dir = Path(scratch) / "slice"
        log(f"exporting {source} at sparsity {sparsity:g} first (to {slice_dir}, removed at the end) ...")
        gisp_deploy.export(source, slice_dir, sparsity)
        return _recover(slice_dir, out, peft, train=train, heldout=heldout, steps=steps, seq_len=seq_len,
                        batch_size=batch_size, lr=lr, rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                        eval_tokens=eval_tokens, seed=seed, overwrite=overwrite, log=log)


def _recover(slice_dir: Path, out: Path, peft, *, train, heldout, steps, seq_len, batch_size, lr, rank, alpha,
             dropout, targets, eval_tokens, seed, overwrite, log) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from gisp_deploy.data import token_stream
    from gisp_deploy.hf import DTYPES
    from gisp_deploy.loss import sequence_nll
    from gisp_deploy.output import atomic_dir, output_lock
    from gisp_deploy.quality.evaluate import perplexity, text_streams
    from gisp_deploy.slicing.export import MAX_SHARD_SIZE, is_export

    hf_logging.disable_progress_bar()
    # gisp_deploy is imported: its classes are registered, so neither call runs the export's modeling file
    model = AutoModelForCausalLM.from_pretrained(slice_dir, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(slice_dir, trust_remote_code=False)
    config = json.loads((slice_dir / "config.json").read_text())
    save_dtype = DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)

    stream = token_stream(tokenizer, train)
    if len(stream) <= seq_len:
        raise ValueError(f"the --train text has {len(stream)} tokens, not more than one --seq-len window "
                         f"({seq_len}); pass more text or a smaller --seq-len")
    held = text_streams(tokenizer, heldout, eval_tokens)

    def measure(m) -> dict:
        m.eval()
        return {name: perplexity(m, s, seq_len, batch_size)[0] for name, s in held.items()}

    before = measure(model)
    for name, ppl in before.items():
        log(f"held-out perplexity before: {ppl:.3f} ({name}, {seq_len}-token windows)")

    names = lora_targets(model, targets)
    if not names:
        raise ValueError(f"the slice has no {'/'.join(targets)} layer with weights to adapt; choose other --targets")
    lcfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                           task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, lcfg)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    log(f"LoRA rank {rank} on {len(names)} projections: {n_train:,} trainable parameters; {steps} steps of "
        f"{batch_size} x {seq_len} tokens from {len(stream):,}")

    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)

    def schedule(i: int) -> float:  # linear warm-up over a tenth of the steps, then cosine decay to zero
        return (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    every = max(1, steps // 10)
    pm.train()
    t0 = time.perf_counter()
    for step in range(steps):
        ids = _windows(stream, seq_len, batch_size, gen)
        ones = torch.ones_like(ids)
        loss = sequence_nll(pm, ids, ones, ones).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == steps:
            recent = losses[-every:]
            log(f"  step {step + 1}/{steps}: training loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")

    merged = pm.merge_and_unload()
    merged.to(save_dtype).to(torch.float32)  # measured as stored (the input was measured so too)
    after = measure(merged)
    for name, ppl in after.items():
        log(f"held-out perplexity after:  {ppl:.3f} ({name}; before {before[name]:.3f})")

    config.setdefault("gisp_slice", {})["lora_recovery"] = {
        "rank": rank, "alpha": alpha, "steps": steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
        "targets": list(targets), "train": [str(p) for p in train], "seed": seed,
        "heldout_perplexity": {"before": before, "after": after}}
    with output_lock(out), atomic_dir(out, overwrite, "export", is_export) as tmp:
        merged.to(save_dtype).save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        merged.to(torch.float32)
        for f in sorted(slice_dir.iterdir()):  # everything but the weights, as the export wrote it
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log(f"wrote {out} (merged, {str(save_dtype).replace('torch.', '')}); load it as the input slice loads")
    return {"out": str(out), "perplexity_before": before, "perplexity_after": after, "losses": losses,
            "lora_targets": names, "trainable_parameters": n_train, "model": merged}


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="lora_recover.py", description=__doc__.split("\n\n")[0],
                                formatter_class=_Help, epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    p.add_argument("source", help="an exported slice (gisp-deploy export), or an artifact with --sparsity")
    p.add_argument("--sparsity", type=float, help="the slice of an artifact to recover (artifacts only)")
    p.add_argument("--train", nargs="+", required=True, help="text files or folders (.txt, .txt.gz) to train on")
    p.add_argument("--heldout", nargs="+", required=True, help="text files to measure perplexity on")
    p.add_argument("--out", required=True, help="directory to write the merged slice to")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--seq-len", type=int, default=128, help="window length for training and perplexity")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (scale alpha / rank)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated projection names to adapt")
    p.add_argument("--eval-tokens", type=int, default=16384, help="first N tokens of each held-out text (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows and the adapter's initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier exported slice at --out")
    a = p.parse_args(argv)
    return dict(source=a.source, out=a.out, sparsity=a.sparsity, train=a.train, heldout=a.heldout, steps=a.steps,
                seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
                targets=[t.strip() for t in a.targets.split(",") if t.strip()], eval_tokens=a.eval_tokens or None,
                seed=a.seed, overwrite=a.overwrite)


def cli(argv=None) -> int:
    kwargs = parse(argv)
    try:
        main(**kwargs, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:  # bad input (gisp-deploy's DataError / ArtifactError are ValueErrors too)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
