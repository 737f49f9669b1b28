"""`inspect --plot`: panels of query heads, KV heads and MLP channels per layer, each sparsity a line that stays
visible where the lines coincide, and a legend beside the data, read from the matplotlib Figure."""

from gisp_deploy.plan import plan_slice
from gisp_deploy.slicing.inspection import widths_figure

SPARSITIES = [0.1, 0.3, 0.5]


def test_widths_panels_one_line_per_sparsity(sources):
    art = sources("llama-gqa").artifact
    fig = widths_figure(art, SPARSITIES)
    assert [ax.get_title() for ax in fig.axes] == ["query heads kept", "KV heads kept", "MLP channels kept"]
    plans = [plan_slice(art.ranking, s) for s in SPARSITIES]
    for ax, field in zip(fig.axes, ("q_heads", "kv_heads", "channels")):
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == [f"s={s:g} ({p.achieved_sparsity:.3f})"
                                                    for s, p in zip(SPARSITIES, plans)]
        for ln, plan in zip(lines, plans):
            assert list(ln.get_ydata()) == [len(getattr(lp, field)) for lp in plan.layers]
        assert ax.get_ylim()[1] >= {"q_heads": 4, "kv_heads": 2, "channels": 48}[field]  # the dense width shows


def test_coinciding_lines_stay_visible_and_legend_is_off_the_data(sources):
    fig = widths_figure(sources("llama-gqa").artifact, SPARSITIES)
    lines = fig.axes[1].get_lines()
    assert len({ln.get_marker() for ln in lines}) == len({ln.get_linestyle() for ln in lines}) == 3
    xs = [tuple(ln.get_xdata()) for ln in lines]
    assert len(set(xs)) == 3 and all(abs(x - round(x)) < 0.2 for row in xs for x in row)  # beside each layer
    fig.draw_without_rendering()
    (legend,) = fig.legends
    assert all(ax.get_legend() is None and not legend.get_window_extent().overlaps(ax.get_window_extent())
               for ax in fig.axes)
