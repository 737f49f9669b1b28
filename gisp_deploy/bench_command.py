"""The `gisp-deploy bench` command: options, progress, the terminal table; measuring is benchmark.py's."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List

import typer

BENCH_EXAMPLES = """
[bold]Examples[/]

  # perplexity at 128/512-token contexts, sizes and load time of the dense model and four slices
  gisp-deploy bench llama3-gisp --sparsities 0.2,0.3,0.4,0.5 --text heldout.txt.gz

  # several artifacts (methods) in one comparison, with task accuracy; plots and report in ./cmp
  gisp-deploy bench llama3-gisp llama3-wanda llama3-random --text heldout.txt.gz \\
      --task continuation-test.margin.jsonl --out cmp

  # vLLM decode speed at batch 1 and 16 against the dense model, and the ideal speed-up
  gisp-deploy bench llama3-gisp --sparsities 0.2,0.4,0.5 --speed --batch-sizes 1,16

Writes OUT/results.json, OUT/report.md and OUT/perplexity.png, accuracy.png, speedup.png.
"""


def _floats(text: str, what: str) -> list[float]:
    from .ranking import parse_sparsities

    try:
        return parse_sparsities(text)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated integers, e.g. 1,16") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag} {text!r}: give positive integers, e.g. 1,16")
    return vals


def bench_command(
    artifacts: List[Path] = typer.Argument(..., help="One or more artifact directories (e.g. one per method)."),
    sparsities: str = typer.Option("0.2,0.3,0.4,0.5", help="Comma-separated sparsities; the dense model (0) "
                                   "is always included."),
    text: List[Path] = typer.Option([], "--text", help="Held-out text (.txt/.txt.gz) for perplexity; repeat for "
                                    "several."),
    task: List[Path] = typer.Option([], "--task", help="Multiple-choice JSONL ({prompt, choices, answer}) for "
                                    "accuracy; repeat for several."),
    seq_lens: str = typer.Option("128,512", help="Context lengths of the perplexity windows."),
    max_tokens: int = typer.Option(65536, help="Use the first N tokens of each text (0: all)."),
    batch_size: int = typer.Option(16, help="Windows per forward pass in the quality measurements."),
    device: str = typer.Option("auto", help="Device of the quality measurements: auto | cpu | cuda."),
    dtype: str = typer.Option("float32", help="dtype of the quality measurements."),
    serve_dtype: str = typer.Option("bfloat16", help="dtype the slices are served in: weight and KV bytes are "
                                    "counted at it, and --speed runs vLLM with it."),
    tp_size: int = typer.Option(1, help="Round per-layer widths for this tensor-parallel size (and run vLLM "
                                "with it)."),
    channel_multiple: int = typer.Option(1, help="Round per-layer MLP widths to a multiple of N."),
    speed: bool = typer.Option(False, "--speed", help="Measure decode speed with vLLM's engine (needs vLLM)."),
    batch_sizes: str = typer.Option("1,16", help="Batch sizes of the speed runs."),
    prompt_len: int = typer.Option(128, help="Prompt tokens per sequence in the speed runs."),
    gen_len: int = typer.Option(64, help="Generated tokens per sequence in the speed runs."),
    repeats: int = typer.Option(3, help="Timed runs per batch size (the median is reported)."),
    eager: bool = typer.Option(False, "--eager", help="Run vLLM without compiled graphs (faster start, often "
                               "slower decode)."),
    out: Path = typer.Option(Path("gisp-bench"), "--out", help="Directory for results.json, report.md and plots "
                             "(created; files in it are replaced)."),
    plots: bool = typer.Option(True, help="Write PNG plots."),
):
    """Quality, size, load time and decode speed of every slice of one or more artifacts, side by side."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .benchmark import Bench, BenchConfig
    from .prune_run import pick_device, pick_dtype
    from .report import environment, write_json, write_markdown, write_plots
    from .speed import SpeedConfig

    for p in [*text, *task]:
        if not p.is_file():
            raise ValueError(f"{p}: no such file")
    speed_cfg = None
    if speed:
        from .serve import require_vllm

        require_vllm()
        speed_cfg = SpeedConfig(batch_sizes=_ints(batch_sizes, "--batch-sizes"), prompt_len=prompt_len,
                                gen_len=gen_len, repeats=repeats, dtype=serve_dtype, tp_size=tp_size,
                                channel_multiple=channel_multiple, enforce_eager=eager)
    dev = pick_device(device)
    cfg = BenchConfig(sparsities=tuple(_floats(sparsities, "--sparsities")), texts=tuple(map(str, text)),
                      seq_lens=_ints(seq_lens, "--seq-lens"), tasks=tuple(map(str, task)),
                      max_tokens=max_tokens or None, batch_size=batch_size, device=str(dev),
                      dtype=pick_dtype(dtype, dev), serve_dtype=serve_dtype, tp_size=tp_size,
                      channel_multiple=channel_multiple, speed=speed_cfg)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    meta = {"command": shlex.join(["gisp-deploy", "bench", *sys.argv[2:]]) if len(sys.argv) > 1 else "bench",
            "environment": environment(), "device": str(dev), "quality_dtype": dtype, "serve_dtype": serve_dtype,
            "sparsities": list(cfg.sparsities), "speed": speed_cfg.__dict__ if speed_cfg else None}
    out.mkdir(parents=True, exist_ok=True)

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,} tokens"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task("perplexity", total=None)

        def on_record(rec):
            write_json(out, bench.records, meta)  # what is measured so far survives an interruption
            write_markdown(out, bench.records, meta)

        bench = Bench(cfg, on_record=on_record, progress=lambda n: progress.advance(bar, n),
                      log=lambda m: progress.console.print(m))
        records = bench.run(artifacts)
    if not records:
        return
    Console(width=None if sys.stdout.isatty() else 240).print(summary_table(records))
    written = [write_json(out, records, meta), write_markdown(out, records, meta)]
    if plots:
        written += write_plots(out, records)
    console.print("wrote " + ", ".join(str(p) for p in written))


def summary_table(records):
    from rich.table import Table

    from .report import _ppl_keys, _speed_rows

    keys = _ppl_keys(records)
    tasks = sorted({t["task"] for r in records for t in r["tasks"]})
    batches = sorted({b for r in records for b in _speed_rows(r)})
    table = Table(title="gisp-deploy bench")
    one_text, one_task = len({t for t, _ in keys}) == 1, len(tasks) == 1
    for col in ["artifact", "method", "sparsity", "achieved", "params", "weights MiB", "KV B/tok", "load s",
                *[f"ppl@{L}" if one_text else f"ppl {t}@{L}" for t, L in keys],
                *["accuracy" if one_task else f"acc {t}" for t in tasks],
                *[f"b{b} tok/s" for b in batches], *[f"b{b} speed-up (ideal)" for b in batches]]:
        table.add_column(col, justify="left" if col in ("artifact", "method") else "right")
    for r in records:
        ppl = {(p["text"], p["seq_len"]): p["perplexity"] for p in r["perplexity"]}
        acc = {t["task"]: t["accuracy"] for t in r["tasks"]}
        sp = _speed_rows(r)
        table.add_row(r["name"], str(r["method"]), f"{r['sparsity']:g}", f"{r['achieved_sparsity']:.4f}",
                      f"{r['parameters'] / 1e6:,.1f}M", f"{r['weight_bytes'] / 2**20:,.1f}",
                      f"{r['kv_bytes_per_token']:,}", f"{r['load_s']:.2f}",
                      *[f"{ppl[k]:.2f}" if k in ppl else "" for k in keys],
                      *[f"{acc[t]:.3f}" if t in acc else "" for t in tasks],
                      *[f"{sp[b]['output_tokens_per_s']:.1f}" if b in sp else "" for b in batches],
                      *[f"{sp[b]['speedup']:.2f} ({sp[b]['ideal_speedup']:.2f})" if b in sp else "" for b in batches])
    return table
