"""`gisp-deploy inspect` and `export`: what an artifact's slices look like, and one slice as a model directory."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .common import (alias_option, budget_options, budget_sparsity, channel_multiple_option, check_budget, console,
                     expect_digest_option, fit_batch_size_option, fit_memory_option, fit_params_option,
                     fit_speedup_option, kv_cache_dtype_option, max_model_len_option, max_num_seqs_option, refit_option,
                     reserve_option, speed_table_option, tp_size_option, verify_option)

INSPECT_EXAMPLES = """
[bold]Examples[/]

  gisp-deploy inspect llama3-gisp
  gisp-deploy inspect llama3-gisp --sparsities 0.2,0.4,0.5 --plot widths.png
  gisp-deploy inspect llama3-gisp --sparsities 0.4 --json > slice.json

  # the slice that a 24 GiB GPU with 8k x 4 tokens of KV cache takes
  gisp-deploy inspect llama3-gisp --fit-memory 24GiB --max-model-len 8192 \\
      --max-num-seqs 4
"""


def default_sparsities(coverage: float) -> list[float]:
    return [round(0.1 * k, 1) for k in range(1, 10) if 0.1 * k <= coverage + 1e-9]


def inspect(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `gisp-deploy prune`."),
    sparsities: Optional[str] = typer.Option(None, help="Comma-separated sparsities (default: 0.1 steps up to "
                                             "coverage)."),
    as_json: bool = typer.Option(False, "--json", help="Print the stable JSON description, with kept indices."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of per-layer widths (query heads, KV heads, MLP "
                                        "channels kept) across sparsities."),
    sparsity: Optional[str] = alias_option("--sparsity"),
    fit_memory: Optional[str] = fit_memory_option(),
    fit_params: Optional[str] = fit_params_option(),
    fit_speedup: Optional[str] = fit_speedup_option(),
    batch_size: int = fit_batch_size_option("--batch-size", "--fit-batch-size"),
    speed_table: Optional[Path] = speed_table_option(),
    max_model_len: Optional[int] = max_model_len_option(),
    max_num_seqs: int = max_num_seqs_option(),
    kv_cache_dtype: str = kv_cache_dtype_option(),
    reserve: str = reserve_option(),
    tp_size: int = tp_size_option(),
    channel_multiple: int = channel_multiple_option(),
):
    """Show what an artifact holds and the per-layer widths of its slices (or of the one a budget chooses)."""
    from ..arguments import parse_sparsities
    from ..artifact import read_manifest

    given = sparsity or sparsities
    sps = parse_sparsities(given) if given else None  # what a typo can break, before the heavy imports
    budget = budget_options(artifact, given, fit_memory=fit_memory, fit_params=fit_params, fit_speedup=fit_speedup,
                            speed_table=speed_table, batch_size=batch_size, max_model_len=max_model_len,
                            max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype, reserve=reserve)
    read_manifest(artifact)

    from ..artifact import load_artifact
    from ..slicing.inspection import describe, plot_widths

    art = load_artifact(artifact, weights=False)  # what it describes is all metadata
    if budget:
        sps = [budget_sparsity(art, budget, tp_size=tp_size, channel_multiple=channel_multiple)]
    sps = sps or default_sparsities(art.ranking.coverage)
    info = describe(art, sps, tp_size=tp_size, channel_multiple=channel_multiple)
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        out = Console()
        out.print(artifact_table(art))
        for table in width_tables(art, info, out.width):
            out.print(table)
    if plot:
        plot_widths(art, sps, plot)
        console.print(f"wrote {plot}", soft_wrap=True)


def artifact_table(art) -> Table:
    """Method, objective, schedule, calibration, model and coverage of an artifact."""
    m = art.manifest
    t = Table(title=f"artifact {art.path}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    calib = m.get("calibration") or {}
    rows = [
        ("method", f"{m.get('method')} (unit {art.ranking.unit}, normalization {m.get('normalization')})"),
        ("objective", str(m.get("objective"))),
        ("schedule", str(m.get("schedule"))),
        ("calibration", f"{calib.get('samples')} x {calib.get('seq_len')} tokens, sha256 {str(calib.get('sha256'))[:16]}…"
         if calib else "none"),
        ("model", f"{art.shape.family}: {art.shape.num_layers} layers, {art.shape.num_heads} heads "
                  f"({art.shape.num_kv_heads} KV), MLP {art.shape.intermediate}"),
        ("coverage", f"up to sparsity {art.ranking.coverage:.4f} ({art.ranking.num_covered}/{len(art.ranking)} "
                     "structures ranked by the run)"),
        ("protected layers", str(m.get("protected_layers"))),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def width_tables(art, info: dict, width: int) -> list[Table]:
    """Kept query heads / KV heads / channels per layer at each described sparsity, in as many tables as it takes
    for each to fit `width` columns (cells are never wrapped)."""
    per_table = max(1, (width - 9) // 17)
    slices = info["slices"]
    tables = []
    for start in range(0, len(slices), per_table):
        t = Table(title="kept per layer: query heads/KV heads/channels" if not start else None)
        t.add_column("layer", justify="right", no_wrap=True)
        group = slices[start:start + per_table]
        for sl in group:
            t.add_column(f"{sl['sparsity']:g} ({sl['achieved_sparsity']:.4f})", justify="right", no_wrap=True)
        for layer in range(art.shape.num_layers):
            t.add_row(str(layer), *(f"{len(lp['q_heads'])}/{len(lp['kv_heads'])}/{len(lp['channels'])}"
                                    for lp in (sl["layers"][layer] for sl in group)))
        tables.append(t)
    return tables


EXPORT_EXAMPLES = """
[bold]Examples[/]

  # the 40% slice as a model directory, in the source checkpoint's dtype
  gisp-deploy export llama3-gisp --sparsity 0.4 --out llama3-40

  # widths split over 2 GPUs, MLP sizes a multiple of 128, bf16
  gisp-deploy export llama3-gisp --sparsity 0.4 --tp-size 2 \\
      --channel-multiple 128 --dtype bfloat16 --out llama3-40-tp2

  # the 40% slice with its o_proj / down_proj refitted (error-correcting)
  gisp-deploy export llama3-gisp --sparsity 0.4 --refit ec --out llama3-40ec

  # the largest slice whose weights and 8k x 4 KV cache fit 24 GiB
  gisp-deploy export llama3-gisp --fit-memory 24GiB --max-model-len 8192 \\
      --max-num-seqs 4 --dtype bfloat16 --out llama3-24g

  # load it (gisp-deploy installed: `import gisp_deploy` first;
  # elsewhere: pass trust_remote_code=True)
  AutoModelForCausalLM.from_pretrained("llama3-40")
"""


def export(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `gisp-deploy prune`."),
    sparsity: Optional[str] = typer.Option(None, help="The sparsity of the slice to export (one value, e.g. 0.4); "
                                           "or let a budget choose it (--fit-memory / --fit-params / "
                                           "--fit-speedup)."),
    out: Path = typer.Option(..., "--out", help="Model directory to write (atomically)."),
    tp_size: int = tp_size_option(),
    channel_multiple: int = channel_multiple_option(),
    dtype: str = typer.Option("auto", help="auto (the source checkpoint's) | float32 | bfloat16 | float16."),
    overwrite: bool = typer.Option(False, help="Replace an existing directory at --out."),
    verify: bool = verify_option(),
    expect_digest: Optional[str] = expect_digest_option(),
    fit_memory: Optional[str] = fit_memory_option(),
    fit_params: Optional[str] = fit_params_option(),
    fit_speedup: Optional[str] = fit_speedup_option(),
    batch_size: int = fit_batch_size_option("--batch-size", "--fit-batch-size"),
    speed_table: Optional[Path] = speed_table_option(),
    max_model_len: Optional[int] = max_model_len_option(),
    max_num_seqs: int = max_num_seqs_option(),
    kv_cache_dtype: str = kv_cache_dtype_option(),
    reserve: str = reserve_option(),
    refit: str = refit_option(),
):
    """Write one slice as a Hugging Face model directory (compact safetensors, tokenizer, config.json with
    per-layer sizes) that AutoModelForCausalLM loads."""
    from ..arguments import check_dtype, check_one_size, check_refit, parse_sparsities
    from ..artifact import read_manifest

    check_one_size(sparsity, fit_memory, fit_params, fit_speedup)  # what a typo can break, before heavy imports
    if sparsity is None and fit_memory is None and fit_params is None and fit_speedup is None:
        raise ValueError("pass --sparsity (e.g. 0.4) or a budget (--fit-memory 24GiB, --fit-params 5B, "
                         "--fit-speedup 1.5)")
    if sparsity is not None:
        parse_sparsities(sparsity)
    budget = check_budget(artifact, fit_memory, fit_params, fit_speedup, speed_table, batch_size, kv_cache_dtype,
                          reserve)
    check_dtype(dtype)
    check_refit(refit)
    read_manifest(artifact)

    from ..slicing.export import export_slice

    options = dict(max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype,
                   reserve=reserve, batch_size=batch_size, speed_table=budget["speed_table"])
    summary = export_slice(artifact, out, sparsity, tp_size=tp_size, channel_multiple=channel_multiple, dtype=dtype,
                           overwrite=overwrite, verify=verify, expect_digest=expect_digest, fit_memory=budget["memory"],
                           fit_params=budget["params"], fit_speedup=budget["speedup"], fit_options=options,
                           refit=refit)
    console.print(
        f"[green]wrote[/] {summary['out']}: {summary['architecture']}, sparsity {summary['sparsity']:g}"
        f"{' (the slice the budget chose)' if sparsity is None else ''} "
        f"(achieved {summary['achieved_sparsity']:.4f}), {summary['parameters'] / 1e6:.2f}M parameters, "
        f"{summary['weight_bytes'] / 2**20:.1f} MiB {summary['dtype']} in {len(summary['weight_files'])} file(s)"
        + (f", corrected ({summary['refit']['name']})" if summary["refit"] else ""),
        soft_wrap=True)



FIT_EXAMPLES = """
[bold]Examples[/]

  # the largest slice for one 24 GiB GPU, 8k context for 16 requests
  gisp-deploy fit llama3-gisp --fit-memory 24GiB --max-model-len 8192 \\
      --max-num-seqs 16 --dtype bfloat16

  # at most 5 billion parameters, embeddings included; as JSON
  gisp-deploy fit llama3-gisp --fit-params 5B --json

  # two 40 GB GPUs (the budget is each GPU's), an fp8 KV cache
  gisp-deploy fit llama3-gisp --fit-memory 40GB --tp-size 2 \\
      --kv-cache-dtype fp8 --max-model-len 32768

  # 1.5x the dense model's decode speed at batch 16, as measured
  gisp-deploy bench llama3-gisp --speed --batch-sizes 1,16 \\
      --sparsities 0.2,0.3,0.4,0.5 --out bench-llama3
  gisp-deploy fit llama3-gisp --fit-speedup 1.5 --batch-size 16 \\
      --speed-table bench-llama3/results.json
"""


def fit(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `gisp-deploy prune`."),
    fit_memory: Optional[str] = fit_memory_option(),
    fit_params: Optional[str] = fit_params_option(),
    fit_speedup: Optional[str] = fit_speedup_option(),
    batch_size: int = fit_batch_size_option("--batch-size", "--fit-batch-size"),
    speed_table: Optional[Path] = speed_table_option(),
    max_model_len: Optional[int] = max_model_len_option(),
    max_num_seqs: int = max_num_seqs_option(),
    dtype: str = typer.Option("auto", help="Weights served in: auto (the source checkpoint's) | float32 | bfloat16 "
                              "| float16."),
    kv_cache_dtype: str = kv_cache_dtype_option(),
    reserve: str = reserve_option(),
    tp_size: int = tp_size_option(),
    channel_multiple: int = channel_multiple_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the choice, its cost and the candidates as JSON."),
    verify: bool = verify_option(),
):
    """The largest slice that fits a memory or parameter budget, or the least pruned one that reaches a decode
    speed-up, with why: the neighbouring slices, the binding constraint and the headroom. Serve it with the
    --sparsity it prints."""
    from ..arguments import check_dtype
    from ..artifact import read_manifest

    if fit_memory is None and fit_params is None and fit_speedup is None:
        raise ValueError("no budget given: pass --fit-memory (e.g. 24GiB), --fit-params (e.g. 5B) and / or "
                         "--fit-speedup (e.g. 1.5)")
    budget = check_budget(artifact, fit_memory, fit_params, fit_speedup, speed_table, batch_size, kv_cache_dtype,
                          reserve)  # before the heavy imports
    check_dtype(dtype)
    read_manifest(artifact)

    from ..budget import fit as fit_budget

    result = fit_budget(artifact, **budget, batch_size=batch_size, max_model_len=max_model_len,
                        max_num_seqs=max_num_seqs, dtype=dtype, kv_cache_dtype=kv_cache_dtype, reserve=reserve,
                        tp_size=tp_size, channel_multiple=channel_multiple, verify=verify)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}", markup=True, highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps({"artifact": str(artifact), **result.to_json()}) + "\n")
        return
    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    out = Console(width=160 if piped else None)  # piped: not cut to 80 columns; else the terminal's width
    for line in fit_lines(artifact, result):
        out.print(line, soft_wrap=True, highlight=False)
    out.print(candidates_table(result, out))


def fit_lines(artifact, result) -> list[str]:
    """The choice, what it costs, what binds it and how to serve it."""
    from ..budget import format_bytes as size, format_count as count

    c, st = result.cost, result.settings
    rounding = "".join(f" --{k.replace('_', '-')} {st[k]}" for k in ("tp_size", "channel_multiple") if st[k] > 1)
    per_gpu = f" per GPU of {st['tp_size']}" if st["tp_size"] > 1 else ""
    lines = [f"[bold]chosen:[/] sparsity {c.sparsity:g} (achieved {c.achieved_sparsity:.4f}), "
             f"{count(c.parameters)} parameters"]
    if st["memory"] is not None:
        lines.append(f"[bold]memory{per_gpu}:[/] weights {size(c.weight_bytes)} ({st['dtype']}) + KV cache "
                     f"{size(c.kv_bytes)} ({st['max_num_seqs']} x {st['max_model_len']} tokens) + reserve "
                     f"{size(st['reserve_bytes'])} ({st['reserve']}) = "
                     f"{size(c.memory + st['reserve_bytes'])} of {size(st['memory'])}")
    if st["speedup"] is not None or st["speed_source"] != "ideal (bytes read)":
        at = (f"batch {st['batch_size']}, {st['speed_context']:g}-token context" if st["speed_source"].startswith("ideal")
              else f"{st['speed_context']:g}-token mean context")
        shown = "not measured at this slice" if result.speedup is None else f"{result.speedup:.3f}x dense decode"
        lines.append(f"[bold]speed-up:[/] {shown} ({st['speed_source']}; {at})")
    left = ", ".join(f"{size(v) if k == 'memory' else f'{v:.3f}x' if k == 'speed-up' else count(v)} of {k}"
                     for k, v in result.headroom.items())
    if result.binding == "none":
        lines.append(f"[bold]binding:[/] none, the dense model fits; headroom {left}")
    else:
        lines.append(f"[bold]binding:[/] {result.binding}: the next larger slice does not meet it; headroom {left}")
    kv_share = c.kv_bytes / c.memory if c.memory else 0
    if st["memory"] is not None and st["unit"] == "q_head" and kv_share > 0.3:
        saved = 1 - c.kv_bytes_per_token / result.dense_kv_bytes_per_token
        lines.append(f"[bold]KV cache:[/] {kv_share:.0%} of weights + KV, {saved:.0%} smaller than dense: q_head slices "
                     "shrink it only when a whole KV group leaves a layer; an artifact pruned with --unit kv_group "
                     "removes whole groups where its ranking finds them cheap (KV saved, below)")
    lines.append(f"[bold]serve it:[/] gisp-deploy serve {artifact} --sparsity {c.sparsity:g}{rounding}")
    return lines


# columns that give way on a narrow terminal, the first first, unless the budget is about them
OPTIONAL_COLUMNS = ("achieved", "KV saved", "parameters", "KV cache", "weights", "total", "ppl", "ideal", "measured")


def candidates_table(result, out: Console) -> Table:
    """The dense model, round sparsities next to the choice, the choice and the next larger slice, in as few
    optional columns as it takes to fit `out`'s width (a column the budget is about stays)."""
    st = result.settings
    needed = {"ideal": st["speedup"], "measured": st["speedup"], "parameters": st["params"], "total": st["memory"]}
    optional = [c for c in OPTIONAL_COLUMNS if needed.get(c) is None]
    for n in range(len(optional) + 1):
        t = candidates_rows(result, drop=optional[:n])
        if out.measure(t, options=out.options.update_width(10_000)).maximum <= out.width:  # unwrapped width
            break
    return t


def candidates_rows(result, drop=()) -> Table:
    """Every column of the candidates table but those in `drop`."""
    from ..budget import format_bytes as size, format_count as count

    st = result.settings
    measured = st["speed_source"].startswith("measured")
    ppl_key = next((k for c in result.candidates for k in sorted(c.perplexity)), None)
    cells = {}  # column -> a cell per candidate
    for cand in result.candidates:
        c = cand.cost
        row = {"sparsity": f"{c.sparsity:g}", "achieved": f"{c.achieved_sparsity:.4f}", "parameters": count(c.parameters),
               "weights": size(c.weight_bytes), "KV cache": size(c.kv_bytes),
               "KV saved": f"{1 - c.kv_bytes_per_token / result.dense_kv_bytes_per_token:.0%}",
               "total": size(c.memory + st["reserve_bytes"]), "ideal": f"{cand.ideal_speedup:.3f}x"}
        if measured:
            row["measured"] = "—" if cand.measured_speedup is None else f"{cand.measured_speedup:.3f}x"
        if ppl_key:
            row["ppl"] = f"{cand.perplexity[ppl_key]:.2f}" if ppl_key in cand.perplexity else "—"
        row["fits"] = verdict(cand, st, measured)
        row[""] = f"[bold]{cand.role}[/]" if cand.role == "chosen" else cand.role
        for k, v in row.items():
            cells.setdefault(k, []).append(v)
    t = Table(title="candidates (per GPU, total with the reserve"
                    + (f"; ppl: {ppl_key.replace('@', ' at ')} tokens" if ppl_key else "") + ")")
    columns = [k for k in cells if k not in drop]
    for col in columns:
        t.add_column(col, justify="left" if col in ("fits", "") else "right", no_wrap=True)
    for i in range(len(result.candidates)):
        t.add_row(*(cells[k][i] for k in columns))
    return t


def verdict(cand, st: dict, measured: bool) -> str:
    """'yes, 1.00 KiB left' / 'no, 0.120x short': the first budget a candidate breaks, else the first given."""
    from ..budget import format_bytes as size, format_count as count

    c = cand.cost
    margins = []  # (left, shown, what too little of it is) per budget given: negative left is broken
    if st["memory"] is not None:
        left = st["memory"] - st["reserve_bytes"] - c.memory
        margins.append((left, size(abs(left)), " over"))
    if st["params"] is not None:
        left = st["params"] - c.parameters
        margins.append((left, count(abs(left)), " over"))  # a count: parameters, beside sizes in MiB
    if st["speedup"] is not None:
        fast = cand.measured_speedup if measured else cand.ideal_speedup
        left = -math.inf if fast is None else fast - st["speedup"]
        margins.append((left, "not measured" if fast is None else f"{abs(left):.3f}x", "" if fast is None
                        else " short"))
    left, shown, broken = next((m for m in margins if m[0] < 0), margins[0])
    return f"yes, {shown} left" if cand.fits else f"[red]no[/], {shown}{broken}"
