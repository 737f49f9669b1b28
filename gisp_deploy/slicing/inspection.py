"""What an artifact holds, for people (tables, a plot) and for programs (`inspect --json`)."""

from __future__ import annotations

from pathlib import Path

from ..plan import plan_slice


def describe(art, sparsities, tp_size: int = 1, channel_multiple: int = 1) -> dict:
    """The stable JSON description: manifest essentials plus, per sparsity, each layer's kept indices (widths
    rounded for deployment by tp_size / channel_multiple, as plan_slice does)."""
    m = art.manifest
    slices = [{**plan.to_json(), **slice_size(art, plan)}
              for plan in (plan_slice(art.ranking, s, tp_size=tp_size, channel_multiple=channel_multiple)
                           for s in sparsities)]
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


def slice_size(art, plan) -> dict:
    """Parameters and weight bytes of the compact model of `plan`, counted on the meta device (nothing loaded)."""
    from ..arguments import dtype_bytes
    from ..budget import model_parameters, weight_dtype
    from ..modeling import padding_params

    params = model_parameters(art.config, plan)
    dtype = weight_dtype("auto", art.config)
    return {"decoder_params": plan.kept_params, "dense_decoder_params": plan.shape.total_params,
            "parameters": params, "padding_parameters": padding_params(plan), "weight_dtype": dtype,
            "weight_bytes": params * dtype_bytes(dtype, default=4)}


MARKERS = "osD^vP*Xh<>p"
LINESTYLES = ("-", "--", "-.", ":")


def widths_figure(art, sparsities):
    """Per-layer widths of each slice, a matplotlib Figure: panels of query heads, KV heads and MLP channels
    kept, one line per sparsity. Lines that coincide (a protected layer keeps everything at every sparsity) stay
    visible: each sparsity has its own marker and dash and is shifted a little sideways; the legend sits
    beside the panels, never on the data."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    shape = art.shape
    layers = range(shape.num_layers)
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    axes = fig.subplots(1, 3, sharex=True)
    panels = [("query heads kept", "heads", shape.num_heads, lambda lp: len(lp.q_heads)),
              ("KV heads kept", "KV heads", shape.num_kv_heads, lambda lp: len(lp.kv_heads)),
              ("MLP channels kept", "channels", shape.intermediate, lambda lp: len(lp.channels))]
    n = len(sparsities)
    shift = 0.3 / max(1, n - 1)  # the lines of one layer spread over 0.3 of a layer
    for k, s in enumerate(sparsities):
        plan = plan_slice(art.ranking, s)
        style = dict(color=colormaps["viridis"](k / max(1, n - 1)), marker=MARKERS[k % len(MARKERS)],
                     linestyle=LINESTYLES[k % len(LINESTYLES)], markersize=5, alpha=0.85,
                     label=f"s={s:g} ({plan.achieved_sparsity:.3f})")
        xs = [layer + (k - (n - 1) / 2) * shift for layer in layers]
        for ax, (_, _, _, width) in zip(axes, panels):
            ax.plot(xs, [width(lp) for lp in plan.layers], **style)
    for ax, (title, unit, full, _) in zip(axes, panels):
        ax.set(title=title, xlabel="layer", ylabel=unit, ylim=(-0.03 * full, full * 1.03))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), title="sparsity (achieved)", loc="outside right upper",
               fontsize=8)
    fig.suptitle(f"{art.manifest.get('method')} — per-layer widths ({art.path.name})")
    return fig


def plot_widths(art, sparsities, path: Path) -> None:
    """widths_figure as a PNG."""
    widths_figure(art, sparsities).savefig(path, dpi=120)
