"""`gisp-deploy bench`: options, progress, the terminal table; measuring is gisp_deploy.benchmark's."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .common import (batch_size_option, channel_multiple_option, device_option, dtype_option, max_tokens_option,
                     task_option, text_option, verify_option)
from .common import lm_eval_limit_option, lm_eval_tasks_option, num_fewshot_option, pass_reporter, progress_bar
from .common import (budget_options, fit_batch_size_option, fit_memory_option, fit_params_option, fit_speedup_option,
                     kv_cache_dtype_option, max_model_len_option, max_num_seqs_option, refit_option, reserve_option,
                     speed_table_option)

BENCH_EXAMPLES = """
[bold]Examples[/]

  # perplexity at 128/512-token contexts, sizes and load time of the dense
  # model and four slices
  gisp-deploy bench llama3-gisp --sparsities 0.2,0.3,0.4,0.5 \\
      --text heldout.txt.gz

  # several artifacts (methods) in one comparison, with task accuracy;
  # plots and report in ./cmp
  gisp-deploy bench llama3-gisp llama3-wanda llama3-random \\
      --text heldout.txt.gz --task heldout-task.margin.jsonl --out cmp

  # the same slices with their load-time correction (error-correcting)
  gisp-deploy bench llama3-gisp --sparsities 0.4,0.5 --refit ec \\
      --text heldout.txt.gz --out cmp-ec

  # vLLM decode speed at batch 1 and 16 against the dense model, and the
  # ideal speed-up
  gisp-deploy bench llama3-gisp --sparsities 0.2,0.4,0.5 --speed \\
      --batch-sizes 1,16

  # standard benchmarks through lm-eval (names in its index, or local task
  # YAML files), with standard errors
  gisp-deploy bench llama3-gisp --sparsities 0.2,0.4 \\
      --lm-eval-tasks hellaswag,arc_easy

  # on a busy machine: add rounds until the last 3 agree within 5% (a
  # warning if they never do)
  gisp-deploy bench llama3-gisp --sparsities 0.4 --speed --until-stable \\
      --tolerance 0.05

  # the slice each artifact gives one 24 GiB GPU (8k x 4 tokens of KV
  # cache), next to the dense model
  gisp-deploy bench llama3-gisp llama3-kvgroup --fit-memory 24GiB \\
      --max-model-len 8192 --max-num-seqs 4 --text heldout.txt.gz

Writes OUT/results.json, OUT/report.md and OUT/perplexity.png,
accuracy.png, speedup.png.
"""


def bench(
    artifacts: List[Path] = typer.Argument(..., help="One or more artifact directories (e.g. one per method)."),
    sparsities: Optional[str] = typer.Option(None, help="Comma-separated sparsities (default 0.2,0.3,0.4,0.5); "
                                             "the dense model (0) is always included. Or a budget chooses one slice "
                                             "per artifact: --fit-memory / --fit-params / --fit-speedup."),
    text: List[Path] = text_option(),
    task: List[Path] = task_option(),
    seq_lens: str = typer.Option("128,512", help="Context lengths of the perplexity windows."),
    max_tokens: int = max_tokens_option(),
    batch_size: int = batch_size_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    serve_dtype: str = typer.Option("bfloat16", help="dtype the slices are served in: weight and KV bytes are "
                                    "counted at it, and --speed runs vLLM with it."),
    tp_size: int = typer.Option(1, help="Round per-layer widths for this tensor-parallel size (and run vLLM "
                                "with it)."),
    channel_multiple: int = channel_multiple_option(),
    speed: bool = typer.Option(False, "--speed", help="Measure decode speed with vLLM's engine (needs vLLM)."),
    batch_sizes: str = typer.Option("1,16", help="Batch sizes of the speed runs."),
    prompt_len: int = typer.Option(128, help="Prompt tokens per sequence in the speed runs."),
    gen_len: int = typer.Option(64, help="Generated tokens per sequence in the speed runs."),
    repeats: int = typer.Option(3, help="Timed rounds per batch size after one warm-up: the slice and the dense "
                                "model in turns; median, min and max are reported."),
    tolerance: float = typer.Option(0.10, help="Repeats agree when (max - min) / median is at most this; beyond "
                                    "it, and for a speed-up above its ideal bound by more than the noise, a warning."),
    until_stable: bool = typer.Option(False, "--until-stable", help="Add rounds until the last --repeats agree "
                                      "within --tolerance, up to --max-repeats (else a warning says so)."),
    max_repeats: int = typer.Option(12, help="Most rounds per batch size with --until-stable."),
    eager: bool = typer.Option(False, "--eager", help="Run vLLM without compiled graphs (faster start, often "
                               "slower decode)."),
    out: Path = typer.Option(Path("gisp-bench"), "--out", help="Directory for results.json, report.md and plots "
                             "(created; files in it are replaced)."),
    plots: bool = typer.Option(True, help="Write PNG plots."),
    verify: bool = verify_option(),
    lm_eval_tasks: str = lm_eval_tasks_option(),
    lm_eval_limit: int = lm_eval_limit_option(),
    num_fewshot: Optional[int] = num_fewshot_option(),
    fit_memory: Optional[str] = fit_memory_option(),
    fit_params: Optional[str] = fit_params_option(),
    fit_speedup: Optional[str] = fit_speedup_option(),
    fit_batch_size: int = fit_batch_size_option(),
    speed_table: Optional[Path] = speed_table_option(),
    max_model_len: Optional[int] = max_model_len_option(),
    max_num_seqs: int = max_num_seqs_option(),
    kv_cache_dtype: str = kv_cache_dtype_option(),
    reserve: str = reserve_option(),
    refit: str = refit_option(),
):
    """Quality, size, load time and decode speed of every slice of one or more artifacts, side by side."""
    from ..arguments import check_device, check_dtype, check_refit, parse_ints, parse_sparsities, require_local
    from ..artifact import read_manifest

    if sparsities is not None:  # everything a typo can break, before the heavy imports
        parse_sparsities(sparsities)
    budget = budget_options(artifacts[0], sparsities, fit_memory=fit_memory, fit_params=fit_params,
                            fit_speedup=fit_speedup, speed_table=speed_table, batch_size=fit_batch_size,
                            max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype,
                            reserve=reserve) or {}
    parse_ints(seq_lens, "--seq-lens", minimum=2, example="128,512")
    parse_ints(batch_sizes, "--batch-sizes")
    check_dtype(dtype, auto=False)
    check_dtype(serve_dtype, "--serve-dtype", auto=False)
    check_device(device)
    check_refit(refit)
    require_local(text, "--text")
    require_local(task, "--task")
    for a in artifacts:
        read_manifest(a)

    from ..benchmark.bench import bench as run
    from ..benchmark.report import warnings

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    command = shlex.join(["gisp-deploy", "bench", *sys.argv[2:]]) if len(sys.argv) > 1 else "bench"
    with progress_bar(transient=True, on=console) as progress:
        records, written = run(artifacts, sparsities=sparsities, texts=text, tasks=task, seq_lens=seq_lens,
                               max_tokens=max_tokens, batch_size=batch_size, device=device, dtype=dtype,
                               serve_dtype=serve_dtype, tp_size=tp_size, channel_multiple=channel_multiple,
                               speed=speed, batch_sizes=batch_sizes, prompt_len=prompt_len, gen_len=gen_len,
                               repeats=repeats, tolerance=tolerance, until_stable=until_stable,
                               max_repeats=max_repeats, eager=eager, out=out, plots=plots, command=command, verify=verify,
                               progress=pass_reporter(progress, keep=False), log=lambda m: progress.console.print(m),
                               lm_eval_tasks=lm_eval_tasks, lm_eval_limit=lm_eval_limit or None,
                               num_fewshot=num_fewshot, refit=refit, **budget)
    if not records:
        return
    Console(width=None if sys.stdout.isatty() else 240).print(results_table(records))
    for w in warnings(records):
        console.print(f"[bold yellow]warning:[/] {escape(w)}")
    console.print("wrote " + ", ".join(str(p) for p in written))


def results_table(records):
    """One row per slice: sizes, load time, perplexities, accuracies, speeds."""
    from rich.table import Table

    from ..benchmark.report import lm_eval_cell, lm_eval_keys, of, ppl_keys, speed_rows, task_names, value

    keys, tasks, lm_keys = ppl_keys(records), task_names(records), lm_eval_keys(records)
    batches = sorted({r["batch_size"] for r in of(records, "speed")})
    table = Table(title="gisp-deploy bench")
    one_text, one_task = len({t for t, _ in keys}) == 1, len(tasks) == 1
    for col in ["artifact", "method", "sparsity", "achieved", "params", "weights MiB", "KV B/tok", "load s",
                *[f"ppl@{L}" if one_text else f"ppl {t}@{L}" for t, L in keys],
                *["accuracy" if one_task else f"acc {t}" for t in tasks],
                *[f"{t} {m}" + ("" if f == "none" else f" ({f})") for t, m, f in lm_keys],
                *[f"b{b} tok/s" for b in batches], *[f"b{b} speed-up (ideal)" for b in batches]]:
        table.add_column(col, justify="left" if col in ("artifact", "method") else "right")
    for r in of(records, "size"):
        at = dict(artifact=r["artifact"], sparsity=r["sparsity"])
        ppl = [value(records, "perplexity", "perplexity", **at, text=t, seq_len=L) for t, L in keys]
        acc = [value(records, "accuracy", "accuracy", **at, task=t) for t in tasks]
        sp = speed_rows(records, r)
        table.add_row(r["name"], str(r["method"]), f"{r['sparsity']:g}", f"{r['achieved_sparsity']:.4f}",
                      f"{r['parameters'] / 1e6:,.1f}M", f"{r['weight_bytes'] / 2**20:,.1f}",
                      f"{r['kv_bytes_per_token']:,}", f"{r['load_s']:.2f}",
                      *[f"{v:.2f}" if v is not None else "" for v in ppl],
                      *[f"{v:.3f}" if v is not None else "" for v in acc],
                      *[lm_eval_cell(records, at, k) for k in lm_keys],
                      *[f"{sp[b]['output_tokens_per_s']:.1f}" if b in sp else "" for b in batches],
                      *[_speedup(sp[b]) if b in sp else "" for b in batches])
    return table


def _speedup(row: dict) -> str:
    """median [min-max] (ideal), marked when a warning says the number is not a fact."""
    mark = " ⚠" if row.get("warnings") else ""
    return f"{row['speedup']:.2f} [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}] ({row['ideal_speedup']:.2f}){mark}"
