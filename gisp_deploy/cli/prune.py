"""`gisp-deploy prune`: rank every head and channel of a model once and write the artifact."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional

import typer

from .common import console, pass_reporter, progress_bar

PRUNE_EXAMPLES = """
[bold]Examples[/]

  # GISP on a local model and local text; the ranking covers up to 60%
  gisp-deploy prune ./Llama-3-8B --calib data/c4-sample.txt.gz \\
      --out llama3-gisp

  # the authors' reference setting (2000 x 256-token windows, 112 steps
  # linear in structures, to 0.7); their batch of 2 sets only the speed
  gisp-deploy prune ./Llama-2-7b --calib c4/ --samples 2000 --seq-len 256 \\
      --steps 112 --schedule structures --max-sparsity 0.7 --out llama2-gisp

  # task-aligned: multiple-choice JSONL ({"prompt", "choices", "answer"})
  gisp-deploy prune ./model --objective margin --calib task.jsonl \\
      --out model-margin

  # rank by the second-order Taylor estimate of the loss change,
  # |W*G - 1/2 F*W^2|, F the diagonal Fisher of per-sequence gradients
  gisp-deploy prune ./model --calib data/ --score mix --out model-mix

  # refit o_proj / down_proj by least squares after every step, so
  # the ranking is what `--refit ls` slices keep
  gisp-deploy prune ./model --calib data/ --in-loop-refit ls \\
      --out model-loop

  # a baseline that writes the same ranking format
  gisp-deploy prune ./model --method wanda-sp --calib data/ \\
      --out model-wanda

  # the weight files byte for byte as the source's (not renumbered)
  gisp-deploy prune ./model --calib data/ --source-order --out model-gisp

  # continue a run that was killed
  gisp-deploy prune ./model --calib data/ --out model-gisp --resume

  # a 70B model over all visible GPUs (layers placed by accelerate)
  gisp-deploy prune ./Llama-3-70B --calib c4/ --device-map auto \\
      --out llama3-70b-gisp

  # 8 GPUs, a model each: each process scores 1/8 of the sequences
  torchrun --nproc-per-node 8 -m gisp_deploy.cli prune ./Llama-3-8B \\
      --calib c4/ --out llama3-gisp
"""


def prune(
    model: str = typer.Argument(..., help="Local Hugging Face model directory (or a hub name when online)."),
    calib: List[str] = typer.Option([], "--calib", help="Calibration data: .txt/.txt.gz files, folders, or JSONL "
                                    "(margin/answer objectives); repeat the option for several. hf://NAME reads a "
                                    "Hugging Face dataset; anything else is a local path."),
    out: Path = typer.Option(..., "--out", help="Artifact directory to write (atomically)."),
    method: str = typer.Option("gisp", help="gisp | oneshot | wanda-sp | magnitude | random."),
    objective: str = typer.Option("lm", help="lm (causal-LM loss) | margin (multiple choice) | answer (loss on answers)."),
    unit: str = typer.Option("q_head", help="Attention unit: q_head (a query head) or kv_group (a KV head with its "
                             "query heads)."),
    steps: int = typer.Option(20, help="Iterative steps; gradients are recomputed on the masked model every step."),
    max_sparsity: float = typer.Option(0.6, help="Parameter sparsity the ranking must cover."),
    schedule: str = typer.Option("params", help="params: linear in removed parameters, exactly --steps steps; "
                                 "structures: the reference's, max-sparsity x structures / steps removed per step "
                                 "until the parameter target, which can take more or fewer steps than --steps "
                                 "(heads and channels differ in size)."),
    normalization: Optional[str] = typer.Option(None, help="reference (authors' block-wise constants) | params "
                                                "(per scored weight) | none. Default: the method's own."),
    score: str = typer.Option("first", help="Gradient methods' per-weight importance, summed per structure: first "
                              "|W*G| (the paper's) | second 1/2 F*W^2 (F: diagonal Fisher, the mean over sequences "
                              "of each one's squared gradient; one more weight-gradient of compute per pass) | mix "
                              "|W*G - 1/2 F*W^2| (the loss change to second order)."),
    in_loop_refit: str = typer.Option("none", help="none | ls: after each step, refit the kept columns of o_proj "
                                      "and down_proj (plus a bias) by least squares from the dense model's input "
                                      "moments, as `load --refit ls` does, so the next step scores the corrected "
                                      "model. One extra forward pass; (H+1)^2 + (I+1)^2 fp64 values per layer."),
    protect_first: float = typer.Option(0.1, help="Never prune the first int(F x layers) layers."),
    protect_last: int = typer.Option(1, help="Never prune the last N layers."),
    samples: int = typer.Option(128, help="Calibration samples (windows, or JSONL records)."),
    seq_len: int = typer.Option(256, help="Tokens per calibration window."),
    batch_size: str = typer.Option("auto", help="Sequences per forward/backward, or auto: the largest power of two "
                                   "up to 64 that fits the GPU (16 on CPU). Changes speed, not the ranking."),
    seed: int = typer.Option(0, help="Seed for window sampling and the random method."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    device_map: Optional[str] = typer.Option(None, help="auto | balanced | sequential: spread the layers of a model "
                                             "too large for one GPU over all visible GPUs (then CPU memory) with "
                                             "accelerate, leaving room for the fp32 gradient sums."),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16."),
    compute: str = typer.Option("compact", help="compact: cut removed structures out of the model between steps, "
                                "so later steps compute less; masked: zero them (the straightforward way). Same "
                                "ranking up to floating-point rounding."),
    resume: bool = typer.Option(False, help="Continue an unfinished run with the same options from its last step."),
    overwrite: bool = typer.Option(False, help="Replace an existing artifact at --out."),
    copy_weights: bool = typer.Option(True, help="Copy the dense weights into the artifact; --no-copy-weights records "
                                      "the source path and sha256 instead."),
    rank_ordered: Optional[bool] = typer.Option(
        None, "--rank-ordered/--source-order",
        help="Write each layer's heads and channels in the ranking's order (the same model, renumbered): every "
             "slice is then a prefix of each tensor, which the CPU loader maps instead of copying. Default: "
             "rank-ordered whenever the weights are copied; --source-order keeps the source's byte-identical "
             "files. `gisp-deploy reorder` rewrites an existing artifact."),
):
    """Rank every attention head and MLP channel of MODEL and write one artifact that serves any sparsity."""
    from ..arguments import check_device, check_dtype, check_in_loop_refit, check_score, require_local

    require_local(calib, "--calib")  # what a typo can break, before the heavy imports
    check_score(score, method, objective)
    check_in_loop_refit(in_loop_refit, method)
    check_dtype(dtype)
    check_device(device)
    if batch_size != "auto" and not batch_size.isdigit():
        raise ValueError(f"--batch-size {batch_size!r}: give a number of sequences, or auto")
    if Path(model).exists() or model.startswith((".", "/")):
        from ..artifact import resolve_model_dir

        resolve_model_dir(model)

    from ..pruning.distributed import Ranks
    from ..pruning.progress import partial_dir
    from ..pruning.run import prune as run

    ranks = Ranks.from_env()  # several processes under torchrun: rank 0 reports and writes
    try:
        with progress_bar() if ranks.is_main else contextlib.nullcontext() as progress:
            summary = run(model, calib=calib, out=out, method=method, objective=objective, unit=unit, steps=steps,
                          max_sparsity=max_sparsity, schedule=schedule, normalization=normalization, score=score,
                          in_loop_refit=in_loop_refit, protect_first=protect_first, protect_last=protect_last,
                          samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, device=device, device_map=device_map, dtype=dtype,
                          compute=compute, resume=resume, overwrite=overwrite, copy_weights=copy_weights,
                          rank_ordered=rank_ordered, ranks=ranks, on_pass=pass_reporter(progress) if progress else None,
                          log=(lambda m: progress.console.print(m)) if progress else (lambda m: None))
    except KeyboardInterrupt:
        where = partial_dir(out)
        kept = f"progress up to the last completed step is kept in {where}; " if where.exists() else ""
        console.print(f"[yellow]interrupted[/]: {kept}rerun the same command with --resume", soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        ranks.stop()
    if not ranks.is_main:
        return
    console.print(
        f"[green]wrote[/] {summary['artifact']}: {summary['method']}, {summary['covered']}/{summary['structures']} "
        f"structures ranked, covers sparsity up to {summary['coverage']:.4f}; {summary['wall_s']:.1f} s, "
        f"{summary['tokens_per_s']:.0f} tokens/s scored" + (f" by {ranks.world} processes" if ranks.world > 1 else ""),
        soft_wrap=True)



REORDER_EXAMPLES = """
[bold]Examples[/]

  # the same artifact, each layer renumbered in its ranking's order
  gisp-deploy reorder llama3-gisp --out llama3-gisp-ranked

  # every slice of it computes what the original's does, and loads as
  # prefixes of the weights (mapped, not copied, on the CPU)
  gisp-deploy eval llama3-gisp-ranked --sparsities 0.4 --text heldout.txt
"""


def reorder(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `gisp-deploy prune`."),
    out: Path = typer.Option(..., "--out", help="Directory of the rank-ordered artifact to write (atomically)."),
    overwrite: bool = typer.Option(False, help="Replace an existing artifact at --out."),
):
    """Rewrite ARTIFACT with every layer's heads and channels in the order its ranking keeps them.

    The model is the same (channels, KV groups and the query heads within a group renumbered together with
    the rows and columns that use them), and so is every slice; but each slice is now a prefix of every
    tensor, which loads at the speed of its bytes. `gisp-deploy prune --rank-ordered` writes this layout
    directly."""
    from ..artifact import read_manifest

    read_manifest(artifact)  # a mistyped path answers before the heavy imports
    from ..pruning.reorder import reorder as run

    with progress_bar() as bars:
        written = run(artifact, out, overwrite=overwrite, progress=pass_reporter(bars))
    console.print(f"[green]wrote[/] {written}: {artifact}, rank-ordered", soft_wrap=True)
