"""What an artifact holds, for people (tables, a plot) and for programs (`inspect --json`)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .plan import plan_slice


def describe(art, sparsities) -> dict:
    """The stable JSON description: manifest essentials plus, per sparsity, each layer's kept indices."""
    m = art.manifest
    slices = [plan_slice(art.ranking, s).to_json() for s in sparsities]
    return {
        "format": f"{m['format']}/{m['format_version']}", "method": m.get("method"), "unit": art.ranking.unit,
        "objective": m.get("objective"), "coverage": round(art.ranking.coverage, 6),
        "schedule": m.get("schedule"), "normalization": m.get("normalization"),
        "protected_layers": m.get("protected_layers"), "calibration": m.get("calibration"),
        "model": {"family": art.shape.family, "layers": art.shape.num_layers, "heads": art.shape.num_heads,
                  "kv_heads": art.shape.num_kv_heads, "intermediate": art.shape.intermediate,
                  "decoder_linear_params": art.shape.total_params},
        "versions": m.get("versions"), "slices": slices,
    }


def summary_table(art) -> Table:
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


def width_table(art, info: dict) -> Table:
    t = Table(title="kept per layer: query heads / KV heads / channels")
    t.add_column("layer", justify="right")
    for sl in info["slices"]:
        t.add_column(f"s={sl['sparsity']:g} (achieved {sl['achieved_sparsity']:.4f})", justify="right")
    for layer in range(art.shape.num_layers):
        cells = []
        for sl in info["slices"]:
            lp = sl["layers"][layer]
            cells.append(f"{len(lp['q_heads'])} / {len(lp['kv_heads'])} / {len(lp['channels'])}")
        t.add_row(str(layer), *cells)
    return t


def plot_widths(art, sparsities, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = art.shape
    layers = list(range(shape.num_layers))
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    cmap = plt.get_cmap("viridis")
    for k, s in enumerate(sparsities):
        plan = plan_slice(art.ranking, s)
        color = cmap(k / max(1, len(sparsities) - 1))
        label = f"s={s:g} ({plan.achieved_sparsity:.3f})"
        ax_h.plot(layers, [len(lp.q_heads) for lp in plan.layers], "o-", color=color, label=label)
        ax_c.plot(layers, [len(lp.channels) for lp in plan.layers], "o-", color=color, label=label)
    ax_h.set(title="query heads kept", xlabel="layer", ylabel="heads", ylim=(-0.3, shape.num_heads + 0.3))
    ax_c.set(title="MLP channels kept", xlabel="layer", ylabel="channels", ylim=(0, shape.intermediate * 1.03))
    for ax in (ax_h, ax_c):
        ax.grid(alpha=0.3)
    ax_c.legend(title="sparsity (achieved)", fontsize=8)
    fig.suptitle(f"{art.manifest.get('method')} — per-layer widths ({art.path.name})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
