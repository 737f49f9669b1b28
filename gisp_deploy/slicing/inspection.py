"""What an artifact holds, for people (tables, a plot) and for programs (`inspect --json`)."""

from __future__ import annotations

from pathlib import Path

from ..plan import plan_slice


def describe(art, sparsities) -> dict:
    """The stable JSON description: manifest essentials plus, per sparsity, each layer's kept indices."""
    m = art.manifest
    slices = [{**plan.to_json(), **slice_size(art, plan)} for plan in (plan_slice(art.ranking, s) for s in sparsities)]
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
    from ..hf import dtype_bytes
    from ..modeling import build_model, compact_config, padding_params

    model = build_model(compact_config(art.config, plan))
    params = sum(p.numel() for p in model.parameters())  # a tied embedding counts once
    dtype = str(getattr(art.config, "dtype", None) or "float32")
    dtype = dtype.removeprefix("torch.")
    return {"decoder_params": plan.kept_params, "dense_decoder_params": plan.shape.total_params,
            "parameters": params, "padding_parameters": padding_params(plan), "weight_dtype": dtype,
            "weight_bytes": params * dtype_bytes(dtype, default=4)}


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
