"""`gisp-deploy inspect` and `export`: what an artifact's slices look like, and one slice as a model directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .common import alias_option, channel_multiple_option, console, expect_digest_option, tp_size_option, verify_option

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

  # load it (gisp-deploy installed: `import gisp_deploy` first;
  # elsewhere: pass trust_remote_code=True)
  AutoModelForCausalLM.from_pretrained("llama3-40")
"""


def export(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `gisp-deploy prune`."),
    sparsity: str = typer.Option(..., help="The sparsity of the slice to export (one value, e.g. 0.4)."),
    out: Path = typer.Option(..., "--out", help="Model directory to write (atomically)."),
    tp_size: int = tp_size_option(),
    channel_multiple: int = channel_multiple_option(),
    dtype: str = typer.Option("auto", help="auto (the source checkpoint's) | float32 | bfloat16 | float16."),
    overwrite: bool = typer.Option(False, help="Replace an existing directory at --out."),
    verify: bool = verify_option(),
    expect_digest: Optional[str] = expect_digest_option(),
):
    """Write one slice as a Hugging Face model directory (compact safetensors, tokenizer, config.json with
    per-layer sizes) that AutoModelForCausalLM loads."""
    from ..arguments import check_dtype, parse_sparsities
    from ..artifact import read_manifest

    parse_sparsities(sparsity)  # what a typo can break, before the heavy imports
    check_dtype(dtype)
    read_manifest(artifact)

    from ..slicing.export import export_slice

    summary = export_slice(artifact, out, sparsity, tp_size=tp_size, channel_multiple=channel_multiple, dtype=dtype,
                           overwrite=overwrite, verify=verify, expect_digest=expect_digest)
    console.print(
        f"[green]wrote[/] {summary['out']}: {summary['architecture']}, sparsity {summary['sparsity']:g} "
        f"(achieved {summary['achieved_sparsity']:.4f}), {summary['parameters'] / 1e6:.2f}M parameters, "
        f"{summary['weight_bytes'] / 2**20:.1f} MiB {summary['dtype']} in {len(summary['weight_files'])} file(s)",
        soft_wrap=True)

