"""`gisp-deploy inspect` and `export`: what an artifact's slices look like, and one slice as a model directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .common import (alias_option, channel_multiple_option, console, expect_digest_option, fit_memory_option,
                     fit_params_option, kv_cache_dtype_option, max_model_len_option, max_num_seqs_option,
                     refit_option, reserve_option, tp_size_option, verify_option)

INSPECT_EXAMPLES = """
[bold]Examples[/]

  gisp-deploy inspect llama3-gisp
  gisp-deploy inspect llama3-gisp --sparsities 0.2,0.4,0.5 --plot widths.png
  gisp-deploy inspect llama3-gisp --sparsities 0.4 --json > slice.json
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
):
    """Show what an artifact holds and the per-layer widths of its slices."""
    from ..arguments import parse_sparsities
    from ..artifact import read_manifest

    given = sparsity or sparsities
    sps = parse_sparsities(given) if given else None  # what a typo can break, before the heavy imports
    read_manifest(artifact)

    from ..artifact import load_artifact
    from ..slicing.inspection import describe, plot_widths

    art = load_artifact(artifact, weights=False)  # what it describes is all metadata
    sps = sps or default_sparsities(art.ranking.coverage)
    info = describe(art, sps)
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
                                           "or let a budget choose it (--fit-memory / --fit-params)."),
    out: Path = typer.Option(..., "--out", help="Model directory to write (atomically)."),
    tp_size: int = tp_size_option(),
    channel_multiple: int = channel_multiple_option(),
    dtype: str = typer.Option("auto", help="auto (the source checkpoint's) | float32 | bfloat16 | float16."),
    overwrite: bool = typer.Option(False, help="Replace an existing directory at --out."),
    verify: bool = verify_option(),
    expect_digest: Optional[str] = expect_digest_option(),
    fit_memory: Optional[str] = fit_memory_option(),
    fit_params: Optional[str] = fit_params_option(),
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

    check_one_size(sparsity, fit_memory, fit_params)  # what a typo can break, before the heavy imports
    if sparsity is None and fit_memory is None and fit_params is None:
        raise ValueError("pass --sparsity (e.g. 0.4) or a budget (--fit-memory 24GiB, --fit-params 5B)")
    if sparsity is not None:
        parse_sparsities(sparsity)
    memory, params = check_budget(fit_memory, fit_params, kv_cache_dtype, reserve)
    check_dtype(dtype)
    check_refit(refit)
    read_manifest(artifact)

    from ..slicing.export import export_slice

    options = dict(max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype,
                   reserve=reserve)
    summary = export_slice(artifact, out, sparsity, tp_size=tp_size, channel_multiple=channel_multiple, dtype=dtype,
                           overwrite=overwrite, verify=verify, expect_digest=expect_digest, fit_memory=memory,
                           fit_params=params, fit_options=options, refit=refit)
    console.print(
        f"[green]wrote[/] {summary['out']}: {summary['architecture']}, sparsity {summary['sparsity']:g}"
        f"{' (the largest slice that fits the budget)' if memory or params else ''} "
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
"""


def fit(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `gisp-deploy prune`."),
    fit_memory: Optional[str] = fit_memory_option(),
    fit_params: Optional[str] = fit_params_option(),
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
    """The largest slice that fits a memory or parameter budget, with why: the neighbouring slices, the binding
    constraint and the headroom. Serve it with the --sparsity it prints."""
    from ..arguments import check_dtype
    from ..artifact import read_manifest

    if fit_memory is None and fit_params is None:
        raise ValueError("no budget given: pass --fit-memory (e.g. 24GiB) and/or --fit-params (e.g. 5B)")
    memory, params = check_budget(fit_memory, fit_params, kv_cache_dtype, reserve)  # before the heavy imports
    check_dtype(dtype)
    read_manifest(artifact)

    from ..budget import fit as fit_budget

    result = fit_budget(artifact, memory=memory, params=params, max_model_len=max_model_len,
                        max_num_seqs=max_num_seqs, dtype=dtype, kv_cache_dtype=kv_cache_dtype, reserve=reserve,
                        tp_size=tp_size, channel_multiple=channel_multiple, verify=verify)
    if as_json:
        sys.stdout.write(json.dumps({"artifact": str(artifact), **result.to_json()}) + "\n")
        return
    out = Console(width=None if sys.stdout.isatty() else 240)  # piped: not cut to 80 columns
    for line in fit_lines(artifact, result):
        out.print(line, soft_wrap=True, highlight=False)
    out.print(candidates_table(result))


def check_budget(fit_memory, fit_params, kv_cache_dtype, reserve) -> tuple[int | None, int | None]:
    """The budget's values checked without torch: (bytes or None, parameters or None)."""
    from ..arguments import check_kv_cache_dtype, parse_bytes, parse_count, parse_reserve

    check_kv_cache_dtype(kv_cache_dtype)
    parse_reserve(reserve)
    return (parse_bytes(fit_memory) if fit_memory is not None else None,
            parse_count(fit_params) if fit_params is not None else None)


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
    left = ", ".join(f"{size(v) if k == 'memory' else count(v)} of {k}" for k, v in result.headroom.items())
    if result.binding == "none":
        lines.append(f"[bold]binding:[/] none, the dense model fits; headroom {left}")
    else:
        lines.append(f"[bold]binding:[/] {result.binding}: the next larger slice does not fit; headroom {left}")
    kv_share = c.kv_bytes / c.memory if c.memory else 0
    if st["memory"] is not None and st["unit"] == "q_head" and kv_share > 0.3:
        saved = 1 - c.kv_bytes_per_token / result.dense_kv_bytes_per_token
        lines.append(f"[bold]KV cache:[/] {kv_share:.0%} of weights + KV, {saved:.0%} smaller than dense: q_head slices "
                     "shrink it only when a whole KV group leaves a layer; an artifact pruned with --unit kv_group "
                     "removes whole groups where its ranking finds them cheap (KV saved, below)")
    lines.append(f"[bold]serve it:[/] gisp-deploy serve {artifact} --sparsity {c.sparsity:g}{rounding}")
    return lines


def candidates_table(result) -> Table:
    """The dense model, round sparsities next to the choice, the choice and the next larger slice."""
    from ..budget import format_bytes as size, format_count as count

    dense_kv = result.dense_kv_bytes_per_token
    t = Table(title="candidates (memory per GPU; total: with the reserve)")
    for col in ("sparsity", "achieved", "parameters", "weights", "KV cache", "KV saved", "total", "fits", ""):
        t.add_column(col, justify="left" if col in ("fits", "") else "right", no_wrap=True)
    st = result.settings
    for cand in result.candidates:
        c = cand.cost
        margins = []  # (left, shown) per budget given: negative left is over
        if st["memory"] is not None:
            left = st["memory"] - st["reserve_bytes"] - c.memory
            margins.append((left, size(abs(left))))
        if st["params"] is not None:
            left = st["params"] - c.parameters
            margins.append((left, count(abs(left)) + " parameters"))
        left, shown = next((m for m in margins if m[0] < 0), margins[0])  # a broken budget says why
        verdict = f"yes, {shown} left" if left >= 0 else f"[red]no[/], {shown} over"
        t.add_row(f"{c.sparsity:g}", f"{c.achieved_sparsity:.4f}", count(c.parameters), size(c.weight_bytes),
                  size(c.kv_bytes), f"{1 - c.kv_bytes_per_token / dense_kv:.0%}", size(c.memory + st["reserve_bytes"]),
                  verdict, f"[bold]{cand.role}[/]" if cand.role == "chosen" else cand.role)
    return t
