"""The `gisp-deploy` command line: a thin layer over the library; each subcommand owns its options."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(
    name="gisp-deploy", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="Prune once with GISP, then cut any sparsity out of one artifact at load time.\n\n"
         "  gisp-deploy prune MODEL --calib DATA --out ARTIFACT\n"
         "  gisp-deploy inspect ARTIFACT --sparsity 0.2,0.4\n"
         "  gisp-deploy eval ARTIFACT --sparsity 0,0.2,0.4 --text heldout.txt\n"
         "  gisp-deploy export ARTIFACT --sparsity 0.4 --out model-40\n"
         "  gisp-deploy serve ARTIFACT --sparsity 0.4\n"
         "  gisp-deploy check ARTIFACT --sparsities 0.2,0.4,0.5\n"
         "  gisp-deploy bench ARTIFACT OTHER-ARTIFACT --text heldout.txt --speed")
console = Console(stderr=True)
EXPECTED_ERRORS = (ValueError, OSError, KeyError)


def friendly(fn):
    """Turn the library's validation errors into one red line and exit status 2, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except EXPECTED_ERRORS as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
    return wrapper


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def pass_reporter(progress: Progress):
    def on_pass(description: str, total: int):
        task = progress.add_task(description, total=total)
        return lambda n: progress.advance(task, n)
    return on_pass


PRUNE_EXAMPLES = """
[bold]Examples[/]

  # GISP on a local model, calibrated on local text, ranking covering up to 60% sparsity
  gisp-deploy prune ./Llama-3-8B --calib data/c4-sample.txt.gz --out llama3-gisp

  # the authors' reference setting (2000 x 256-token windows, 112 steps linear in structures, to 0.7);
  # their batch of 2 changes only the speed, so the micro-batch is left to fit the GPU
  gisp-deploy prune ./Llama-2-7b --calib c4/ --samples 2000 --seq-len 256 \\
      --steps 112 --schedule structures --max-sparsity 0.7 --out llama2-gisp

  # task-aligned calibration on multiple-choice JSONL ({"prompt", "choices", "answer"})
  gisp-deploy prune ./model --objective margin --calib task.jsonl --out model-margin

  # a baseline that writes the same ranking format
  gisp-deploy prune ./model --method wanda-sp --calib data/ --out model-wanda

  # continue a run that was killed
  gisp-deploy prune ./model --calib data/ --out model-gisp --resume

  # a 70B model over all visible GPUs (layers placed by accelerate; one GPU computes at a time)
  gisp-deploy prune ./Llama-3-70B --calib c4/ --device-map auto --out llama3-70b-gisp

  # 8 GPUs, a model each: every process scores 1/8 of the sequences (data parallel, one all-reduce per step)
  torchrun --nproc-per-node 8 -m gisp_deploy.cli prune ./Llama-3-8B --calib c4/ --out llama3-gisp
"""


@app.command(epilog=PRUNE_EXAMPLES)
@friendly
def prune(
    model: str = typer.Argument(..., help="Local Hugging Face model directory (or a hub name when online)."),
    calib: List[str] = typer.Option([], "--calib", help="Calibration data: .txt/.txt.gz files, folders, or JSONL "
                                    "(margin/answer objectives); repeat the option for several."),
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
):
    """Rank every attention head and MLP channel of MODEL and write one artifact that serves any sparsity."""
    from .distributed import Ranks
    from .methods import ComputeOptions, PruneConfig
    from .prune_run import partial_dir, run_prune

    if batch_size != "auto" and not batch_size.isdigit():
        raise ValueError(f"--batch-size {batch_size!r}: give a number of sequences, or auto")
    cfg = PruneConfig(method=method, unit=unit, objective=objective, steps=steps, max_sparsity=max_sparsity,
                      schedule=schedule, normalization=normalization, protect_first=protect_first,
                      protect_last=protect_last, seed=seed, samples=samples, seq_len=seq_len,
                      batch_size=None if batch_size == "auto" else int(batch_size))
    ranks = Ranks.from_env()  # several processes under torchrun: rank 0 reports and writes
    try:
        with progress_bar() if ranks.is_main else contextlib.nullcontext() as progress:
            summary = run_prune(model, calib, out, cfg, device=device, dtype=dtype, device_map=device_map,
                                compute=ComputeOptions(compute, ranks=ranks), resume=resume,
                                overwrite=overwrite, copy_weights=copy_weights,
                                on_pass=pass_reporter(progress) if progress else None,
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


INSPECT_EXAMPLES = """
[bold]Examples[/]

  gisp-deploy inspect llama3-gisp
  gisp-deploy inspect llama3-gisp --sparsity 0.2,0.4,0.5 --plot widths.png
  gisp-deploy inspect llama3-gisp --sparsity 0.4 --json > slice.json
"""


def default_sparsities(coverage: float) -> list[float]:
    return [round(0.1 * k, 1) for k in range(1, 10) if 0.1 * k <= coverage + 1e-9]


@app.command(epilog=INSPECT_EXAMPLES)
@friendly
def inspect(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `gisp-deploy prune`."),
    sparsity: Optional[str] = typer.Option(None, help="Comma-separated sparsities (default: 0.1 steps up to coverage)."),
    as_json: bool = typer.Option(False, "--json", help="Print the stable JSON description, with kept indices."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of per-layer widths across sparsities."),
):
    """Show what an artifact holds and the per-layer widths of its slices."""
    from .inspection import describe, plot_widths, summary_table, width_table

    from .artifact import load_artifact
    from .ranking import parse_sparsities

    art = load_artifact(artifact)
    sps = parse_sparsities(sparsity) if sparsity else default_sparsities(art.ranking.coverage)
    info = describe(art, sps)
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        out = Console()
        out.print(summary_table(art))
        out.print(width_table(art, info))
    if plot:
        plot_widths(art, sps, plot)
        console.print(f"wrote {plot}", soft_wrap=True)


EVAL_EXAMPLES = """
[bold]Examples[/]

  gisp-deploy eval llama3-gisp --sparsity 0,0.2,0.4 --text heldout/persuasion.txt.gz
  gisp-deploy eval llama3-gisp --sparsity 0.4 --text a.txt --text b.txt --seq-len 128,512 --json
  gisp-deploy eval llama3-gisp --sparsity 0,0.4 --task continuation-test.margin.jsonl
"""


@app.command("eval", epilog=EVAL_EXAMPLES)
@friendly
def eval_(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    sparsity: str = typer.Option("0", help="Comma-separated sparsities; 0 is the dense model."),
    text: List[Path] = typer.Option([], "--text", help="Held-out text file(s) (.txt/.txt.gz); repeat for several."),
    task: List[Path] = typer.Option([], "--task", help="Multiple-choice JSONL ({prompt, choices, answer}) to score "
                                    "accuracy on; repeat for several."),
    seq_len: str = typer.Option("128", help="Comma-separated context lengths (non-overlapping windows)."),
    max_tokens: int = typer.Option(65536, help="Evaluate the first N tokens of each text (0: all)."),
    batch_size: int = typer.Option(16, help="Windows per forward pass."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
    path: str = typer.Option("compact", help="compact: load each slice as a smaller model; oracle: the dense "
                             "model with removed structures zeroed (what the slice must compute)."),
    tp_size: int = typer.Option(1, help="Round per-layer widths for this tensor-parallel size."),
    channel_multiple: int = typer.Option(1, help="Round per-layer MLP widths to a multiple of N."),
    as_json: bool = typer.Option(False, "--json", help="Print {\"results\": [...]} as JSON on stdout."),
):
    """Held-out perplexity and task accuracy of slices of an artifact."""
    from .artifact import load_artifact
    from .evaluate import evaluate_slices
    from .plan import plan_slice
    from .prune_run import load_tokenizer, pick_device, pick_dtype
    from .ranking import parse_sparsities

    if not text and not task:
        raise ValueError("nothing to evaluate: pass --text FILE (perplexity) and/or --task FILE.jsonl (accuracy)")
    art = load_artifact(artifact)
    sps = parse_sparsities(sparsity)
    for s in sps:  # refuse out-of-coverage or unroundable sparsities before loading anything
        plan_slice(art.ranking, s, tp_size=tp_size, channel_multiple=channel_multiple)
    lens = [int(x) for x in seq_len.split(",") if x]
    if not lens or min(lens) < 2:
        raise ValueError(f"--seq-len {seq_len!r}: give context lengths >= 2, e.g. 128,512")
    dev = pick_device(device)
    tok = load_tokenizer(art.path)
    with progress_bar() as progress:
        bar = progress.add_task("evaluating", total=None)
        records = evaluate_slices(art, tok, sps, [str(t) for t in text], lens, path=path, device=dev,
                                  dtype=pick_dtype(dtype, dev), tp_size=tp_size, channel_multiple=channel_multiple,
                                  max_tokens=max_tokens or None, batch_size=batch_size,
                                  progress=lambda n: progress.advance(bar, n), tasks=[str(t) for t in task])
    if as_json:
        sys.stdout.write(json.dumps({"artifact": str(artifact), "method": art.manifest.get("method"),
                                     "results": records}) + "\n")
        return
    table = Table(title=f"{artifact} ({art.manifest.get('method')})")
    for col in ("sparsity", "achieved", "text / task", "seq_len", "perplexity", "accuracy"):
        table.add_column(col, justify="right")
    for r in records:
        if "perplexity" in r:
            table.add_row(f"{r['sparsity']:g}", f"{r['achieved_sparsity']:.4f}", r["text"], str(r["seq_len"]),
                          f"{r['perplexity']:.2f}", "")
        else:
            table.add_row(f"{r['sparsity']:g}", f"{r['achieved_sparsity']:.4f}", r["task"], "", "",
                          f"{r['accuracy']:.3f} ({r['items']} items)")
    Console().print(table)


EXPORT_EXAMPLES = """
[bold]Examples[/]

  # the 40% slice as a model directory, in the source checkpoint's dtype
  gisp-deploy export llama3-gisp --sparsity 0.4 --out llama3-40

  # widths split over 2 GPUs, MLP sizes a multiple of 128, bf16
  gisp-deploy export llama3-gisp --sparsity 0.4 --tp-size 2 \\
      --channel-multiple 128 --dtype bfloat16 --out llama3-40-tp2

  # load it (gisp-deploy installed: `import gisp_deploy` first;
  # elsewhere: pass trust_remote_code=True)
  AutoModelForCausalLM.from_pretrained("llama3-40")
"""


@app.command(epilog=EXPORT_EXAMPLES)
@friendly
def export(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `gisp-deploy prune`."),
    sparsity: str = typer.Option(..., help="The sparsity of the slice to export (one value, e.g. 0.4)."),
    out: Path = typer.Option(..., "--out", help="Model directory to write (atomically)."),
    tp_size: int = typer.Option(1, help="Round per-layer widths so they split over this tensor-parallel size."),
    channel_multiple: int = typer.Option(1, help="Round per-layer MLP widths to a multiple of N (e.g. 64, 128)."),
    dtype: str = typer.Option("auto", help="auto (the source checkpoint's) | float32 | bfloat16 | float16."),
    overwrite: bool = typer.Option(False, help="Replace an existing directory at --out."),
):
    """Write one slice as a Hugging Face model directory (compact safetensors, tokenizer, config.json with
    per-layer sizes) that AutoModelForCausalLM loads."""
    from .artifact import load_artifact
    from .export import export_slice
    from .ranking import SparsityError, parse_sparsities

    sps = parse_sparsities(sparsity)
    if len(sps) != 1:
        raise SparsityError(f"--sparsity {sparsity!r}: export writes one slice; give one value, e.g. --sparsity 0.4")
    if out.exists() and not overwrite:  # before any loading
        raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
    art = load_artifact(artifact)
    summary = export_slice(art, out, sps[0], tp_size=tp_size, channel_multiple=channel_multiple, dtype=dtype,
                           overwrite=overwrite)
    console.print(
        f"[green]wrote[/] {summary['out']}: {summary['architecture']}, sparsity {summary['sparsity']:g} "
        f"(achieved {summary['achieved_sparsity']:.4f}), {summary['parameters'] / 1e6:.2f}M parameters, "
        f"{summary['weight_bytes'] / 2**20:.1f} MiB {summary['dtype']} in {len(summary['weight_files'])} file(s)",
        soft_wrap=True)


CHECK_EXAMPLES = """
[bold]Examples[/]

  # integrity, nesting, and each slice loads and matches the oracle
  gisp-deploy check llama3-gisp --sparsities 0.2,0.4,0.5

  # quality gates and CI reports; exit status 1 when anything fails
  gisp-deploy check llama3-gisp --sparsities 0.2,0.4 --text heldout.txt --max-ppl-ratio 1.6 \\
      --task task.jsonl --min-accuracy 0.5 --junit check.xml --json check.json

  # also run every slice in vLLM: its greedy tokens must equal the compact model's (needs gisp-deploy[vllm])
  gisp-deploy check llama3-gisp --sparsities 0.2,0.4 --serve
"""


@app.command(epilog=CHECK_EXAMPLES)
@friendly
def check(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    sparsities: str = typer.Option("0.2,0.4,0.5", help="Comma-separated sparsities that you deploy."),
    text: Optional[Path] = typer.Option(None, help="Held-out text: probe tokens, and perplexity for --max-ppl-ratio."),
    max_ppl_ratio: Optional[float] = typer.Option(None, help="Fail a slice whose perplexity exceeds R x dense."),
    seq_len: int = typer.Option(128, help="Context length of the perplexity check."),
    task: Optional[Path] = typer.Option(None, help="Multiple-choice JSONL for --min-accuracy."),
    min_accuracy: Optional[float] = typer.Option(None, help="Fail a slice whose task accuracy is below A."),
    tp_size: int = typer.Option(1, help="Check the slices rounded for this tensor-parallel size."),
    channel_multiple: int = typer.Option(1, help="Check the slices with MLP widths rounded to a multiple of N."),
    junit: Optional[Path] = typer.Option(None, help="Write a JUnit XML report here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write a JSON report here."),
    serve: bool = typer.Option(False, "--serve", help="Also run each slice in vLLM (as `gisp-deploy serve` does) and "
                               "check that its greedy tokens on probe prompts equal the compact model's."),
    serve_timeout: float = typer.Option(1800.0, help="Seconds vLLM may take for all slices of --serve together."),
):
    """Check an artifact and each deployed slice; exit 1 if any check fails."""
    from .check import check_artifact, write_json, write_junit
    from .ranking import parse_sparsities

    if serve:  # before anything is loaded
        from .serve import require_vllm

        require_vllm()
    sps = parse_sparsities(sparsities)
    if max_ppl_ratio is not None and text is None:
        raise ValueError("--max-ppl-ratio needs --text FILE to measure perplexity on")
    if min_accuracy is not None and task is None:
        raise ValueError("--min-accuracy needs --task FILE.jsonl")

    def show(r):
        mark = "[green]PASS[/]" if r.ok else "[bold red]FAIL[/]"
        console.print(f"{mark} {r.name}: {r.message}", soft_wrap=True, highlight=False)

    checker = check_artifact(artifact, sps, text=text, seq_len=seq_len, max_ppl_ratio=max_ppl_ratio, task=task,
                             min_accuracy=min_accuracy, tp_size=tp_size, channel_multiple=channel_multiple,
                             serve=serve, serve_timeout=serve_timeout, progress=show)
    if junit:
        write_junit(checker, junit, f"gisp-deploy check {artifact.name}")
    if json_out:
        write_json(checker, json_out, str(artifact))
    failed = [r for r in checker.results if not r.ok]
    console.print(f"{len(checker.results) - len(failed)} passed, {len(failed)} failed", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


MAKE_TASK_EXAMPLES = """
[bold]Examples[/]

  # 300 four-way items from held-out text: heldout-task.margin.jsonl and heldout-task.answer.jsonl
  gisp-deploy make-task ./Llama-3-8B --text heldout.txt.gz --items 300 --out heldout-task

  # calibration items from training text for task-aligned pruning, then the matching test items
  gisp-deploy make-task ./model --text train/ --items 128 --seed 1 --out calib-task
  gisp-deploy prune ./model --objective margin --calib calib-task.margin.jsonl --out model-margin
  gisp-deploy bench model-margin model-lm --task heldout-task.margin.jsonl
"""


@app.command("make-task", epilog=MAKE_TASK_EXAMPLES)
@friendly
def make_task(
    model: Path = typer.Argument(..., help="A model or artifact directory; only its tokenizer is used."),
    text: List[Path] = typer.Option(..., "--text", help="Text files/folders the passages come from."),
    out: Path = typer.Option(..., "--out", help="Prefix of the files: OUT.margin.jsonl and OUT.answer.jsonl."),
    items: int = typer.Option(300, help="Number of items."),
    choices: int = typer.Option(4, help="Options per item (the true continuation and distractors)."),
    context_tokens: int = typer.Option(48, help="Tokens of passage shown."),
    continuation_tokens: int = typer.Option(12, help="Tokens of each option."),
    seed: int = typer.Option(0, help="Seed for choosing passages, distractors and answer positions."),
):
    """Build a multiple-choice task from text: pick the true continuation of a passage among distractors taken
    from nearby in the same text. Writes the margin format ({prompt, choices, answer}) and the answer format
    ({prompt, answer})."""
    from .prune_run import load_tokenizer
    from .tasks import build_continuation_task, write_jsonl

    if items < 1 or choices < 2:
        raise ValueError("--items must be >= 1 and --choices >= 2")
    rows = build_continuation_task(load_tokenizer(model), [str(t) for t in text], items, context_tokens,
                                   continuation_tokens, choices, seed)
    margin, answer = Path(f"{out}.margin.jsonl"), Path(f"{out}.answer.jsonl")
    write_jsonl(rows, margin)
    write_jsonl([{"prompt": r["prompt"], "answer": r["choices"][r["answer"]]} for r in rows], answer)
    console.print(f"[green]wrote[/] {len(rows)} items to {margin} and {answer}", soft_wrap=True)


def _register_serve():
    from .serve import SERVE_EXAMPLES, serve_command

    app.command("serve", epilog=SERVE_EXAMPLES)(friendly(serve_command))


_register_serve()


def _register_bench():
    from .bench_command import BENCH_EXAMPLES, bench_command

    app.command("bench", epilog=BENCH_EXAMPLES)(friendly(bench_command))


_register_bench()


def main():
    app()


if __name__ == "__main__":
    main()
