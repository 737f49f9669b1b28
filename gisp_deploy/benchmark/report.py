"""What `gisp-deploy bench` writes: results.json, report.md and PNG plots, from its list of records."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def environment() -> dict:
    import torch
    import transformers

    from .. import __version__

    env = {"gisp_deploy": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu": _cpu_name(), "cpus": len(os.sched_getaffinity(0)),
           "torch_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    from importlib.metadata import PackageNotFoundError, version

    try:
        env["lm_eval"] = version("lm_eval")
    except PackageNotFoundError:
        env["lm_eval"] = None
    try:
        from ..serving.process import vllm_distribution

        dist = vllm_distribution()
        env["vllm"] = f"{dist} {version(dist)}" if dist else None
    except Exception:  # metadata of a broken install: report what is known
        env["vllm"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(out: Path, records: list[dict], meta: dict) -> Path:
    path = Path(out) / "results.json"
    _write_atomic(path, json.dumps({**meta, "warnings": warnings(records), "results": records}, indent=2) + "\n")
    return path


def warnings(records) -> list[str]:
    """Every record's warnings, each naming its slice and batch size."""
    return [f"{label(r)} at sparsity {r['sparsity']:g}, batch {r['batch_size']}: {w}"
            for r in of(records, "speed") for w in r.get("warnings", ())]


def label(rec: dict) -> str:
    return f"{rec['name']} ({rec['method']})"


def of(records, measure: str) -> list[dict]:
    return [r for r in records if r["measure"] == measure]


def _series(records, measure: str = "size") -> dict[str, list[dict]]:
    """{artifact label: its `measure` records in sparsity order}, in the order the artifacts were given."""
    out: dict[str, list] = {}
    for r in of(records, measure):
        out.setdefault(label(r), []).append(r)
    return out


def ppl_keys(records) -> list[tuple[str, int]]:
    """(text, seq_len) of the perplexity measurements, in the order first measured."""
    return list(dict.fromkeys((r["text"], r["seq_len"]) for r in of(records, "perplexity")))


def task_names(records) -> list[str]:
    return sorted({r["task"] for r in of(records, "accuracy")})


def lm_eval_keys(records) -> list[tuple[str, str, str]]:
    """(task, metric, filter) of the lm-eval measurements, in the order first measured."""
    return list(dict.fromkeys((r["task"], r["metric"], r["filter"]) for r in of(records, "lm_eval")))


def lm_eval_cell(records, at: dict, key: tuple[str, str, str]) -> str:
    """'0.610 ± 0.049' for the lm-eval (task, metric, filter) of the slice `at` (artifact, sparsity); '' if none."""
    task, metric, filt = key
    rec = next((r for r in of(records, "lm_eval") if r["task"] == task and r["metric"] == metric
                and r["filter"] == filt and all(r[k] == v for k, v in at.items())), None)
    if rec is None:
        return ""
    return f"{rec['value']:.3f}" + (f" ± {rec['stderr']:.3f}" if rec["stderr"] is not None else "")


def value(records, measure: str, field: str, **match):
    """`field` of the first `measure` record whose fields equal `match`, else None."""
    return next((r[field] for r in of(records, measure) if all(r.get(k) == v for k, v in match.items())), None)


def speed_rows(records, slice_rec: dict) -> dict[int, dict]:
    """{batch size: speed record} of the slice `slice_rec` (any record of it)."""
    return {r["batch_size"]: r for r in of(records, "speed")
            if r["artifact"] == slice_rec["artifact"] and r["sparsity"] == slice_rec["sparsity"]}


def _range(row: dict, key: str, scale: float, fmt: str) -> str:
    return (f"{row[key] * scale:{fmt}} [{row[key + '_min'] * scale:{fmt}}-{row[key + '_max'] * scale:{fmt}}]"
            if key + "_min" in row else f"{row[key] * scale:{fmt}}")


def _mb(n):
    return f"{n / 2**20:,.1f}"


def write_markdown(out: Path, records: list[dict], meta: dict) -> Path:
    series = _series(records)
    sps = sorted({r["sparsity"] for r in of(records, "size")})
    env = meta["environment"]
    lines = ["# gisp-deploy bench", "", f"Command: `{meta['command']}`", "",
             f"Machine: {env['cpu']} ({env['cpus']} CPUs), GPU: {env['gpu'] or 'none'}; torch {env['torch']}, "
             f"transformers {env['transformers']}, vLLM {env['vllm'] or '-'}.",
             f"Quality in {meta['quality_dtype']} on {meta['device']}; bytes at {meta['serve_dtype']}.", ""]
    header = ["| artifact | " + " | ".join(f"{s:g}" for s in sps) + " |", "|---" * (len(sps) + 1) + "|"]
    for text, L in ppl_keys(records):
        lines += [f"## Perplexity, {text}, {L}-token windows", "", *header]
        for name, recs in series.items():
            by = {r["sparsity"]: value(records, "perplexity", "perplexity", artifact=r["artifact"],
                                       sparsity=r["sparsity"], text=text, seq_len=L) for r in recs}
            lines.append(f"| {name} | " + " | ".join(f"{by[s]:.2f}" if by.get(s) else "" for s in sps) + " |")
        lines.append("")
    for task in task_names(records):
        lines += [f"## Task accuracy, {task}", "", *header]
        for name, recs in series.items():
            by = {r["sparsity"]: value(records, "accuracy", "accuracy", artifact=r["artifact"], sparsity=r["sparsity"],
                                       task=task) for r in recs}
            lines.append(f"| {name} | " + " | ".join(f"{by[s]:.3f}" if by.get(s) is not None else "" for s in sps)
                         + " |")
        lines.append("")
    for key in lm_eval_keys(records):
        task, metric, filt = key
        first = next(r for r in of(records, "lm_eval") if (r["task"], r["metric"], r["filter"]) == key)
        lines += [f"## lm-eval {task}, {metric}{'' if filt == 'none' else f' ({filt})'} ± standard error, "
                  f"{first['items']} items, {first['num_fewshot']}-shot, lm-eval {first['lm_eval_version']}", "",
                  *header]
        for name, recs in series.items():
            lines.append(f"| {name} | " + " | ".join(
                lm_eval_cell(records, {"artifact": recs[0]["artifact"], "sparsity": s}, key) for s in sps) + " |")
        lines.append("")
    lines += ["## Size and load time", "", "| artifact | sparsity | achieved | decoder params | parameters | "
              "weights MiB | KV bytes/token | load s |", "|---" * 8 + "|"]
    for name, recs in series.items():
        for r in recs:
            lines.append(f"| {name} | {r['sparsity']:g} | {r['achieved_sparsity']:.4f} | {r['decoder_params']:,} | "
                         f"{r['parameters']:,} | {_mb(r['weight_bytes'])} | {r['kv_bytes_per_token']:,} | "
                         f"{r['load_s']:.2f} |")
    lines.append("")
    speed = of(records, "speed")
    if speed:
        s0 = speed[0]
        lines += [f"## Decode speed on vLLM ({s0['prompt_len']}-token prompts, {s0['gen_len']} new tokens, "
                  f"{s0['dtype']})", "",
                  "Median [min-max] over the timed rounds; a slice and the dense model run in turns, both engines "
                  "alive, so each round's speed-up compares the same minute of the machine.", "",
                  "| artifact | sparsity | batch | rounds | output tok/s | TTFT ms | TPOT ms | speed-up | ideal | "
                  "fraction of ideal |", "|---" * 10 + "|"]
        for row in speed:
            mark = " ⚠" if row.get("warnings") else ""
            lines.append(f"| {label(row)} | {row['sparsity']:g} | {row['batch_size']} | {row['repeats']} | "
                         f"{row['output_tokens_per_s']:.1f} | {_range(row, 'ttft_s', 1e3, '.1f')} | "
                         f"{_range(row, 'tpot_s', 1e3, '.2f')} | {_range(row, 'speedup', 1, '.3f')}{mark} | "
                         f"{row['ideal_speedup']:.3f} | {row['fraction_of_ideal']:.3f} |")
        lines += ["", "Speed-up: the dense model's time per output token ÷ the slice's, in the same round. Ideal: "
                  "bytes a decode step reads (weights but the embedding table, plus the batch's KV cache at the mean "
                  "context) for the dense model ÷ for the slice. Fraction of ideal: speed-up ÷ ideal.", ""]
        if warnings(records):
            lines += ["## Warnings", "", *(f"- ⚠ {w}" for w in warnings(records)), ""]
    path = Path(out) / "report.md"
    _write_atomic(path, "\n".join(lines) + "\n")
    return path


def _panels(n: int, title: str, draw):
    """A row of `n` plots, draw(k, axes) filling the k-th, with one legend for them all below the row (never over
    a line); None when n is 0."""
    if n == 0:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * n, 4.8), layout="constrained")
    for k, ax in enumerate(fig.subplots(1, n, squeeze=False)[0]):
        draw(k, ax)
        ax.grid(alpha=0.3)
        ax.set_xlabel("sparsity (achieved, fraction of decoder linear parameters)")
    entries = {}  # label -> handle, over every panel: an artifact is one entry however many panels show it
    for ax in fig.axes:
        handles, labels = ax.get_legend_handles_labels()
        entries.update(zip(labels, handles))
    fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncols=min(len(entries), 3),
               fontsize=8)
    fig.suptitle(title)
    return fig


def plain_log_axis(ax, values) -> None:
    """A log y axis around `values` labelled with plain numbers (70, 100, 200; never 7×10^1): ticks at powers of
    ten, else 1-2-5 or 1..9 steps, the coarsest giving three inside the data; three rounded values when even
    1..9 steps give fewer than two. Minor ticks stay unlabelled."""
    import math

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = min(values) / 1.08, max(values) * 1.08
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = []
    for steps in ((1,), (1, 2, 5), range(1, 10)):
        ticks = [m * 10.0 ** d for d in decades for m in steps if lo <= m * 10.0 ** d <= hi]
        if len(ticks) >= 3:
            break
    if len(ticks) < 2:  # the data spans less than one 1..9 step: its ends and middle
        ticks = [float(f"{v:.3g}") for v in (lo * 1.04, math.sqrt(lo * hi), hi / 1.04)]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def wilson_interval(accuracy: float, items: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion: right near 0 and 1 and for few items, where
    the normal approximation p ± z·sqrt(p(1-p)/n) leaves [0, 1]."""
    n, p = items, accuracy
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return centre - half, centre + half


def _chance(rec: dict) -> float | None:
    """The accuracy of guessing on the record's task (records before `chance` was recorded: 1/choices)."""
    if "chance" in rec:
        return rec["chance"]
    return 1 / rec["choices"] if rec.get("choices") else None


def figures(records: list[dict]) -> dict:
    """The plots of `records` as matplotlib Figures by file name: perplexity.png, accuracy.png, speedup.png,
    each with one panel per text and context length, task or batch size (at most 4), those with data."""
    from matplotlib import colormaps

    colors = {name: colormaps["tab10"](k % 10) for k, name in enumerate(_series(records))}
    # hollow markers of a shape per artifact: where two artifacts measure the same, both stay visible
    marks = {name: dict(marker="osD^vP*X"[k % 8], mfc="none", mew=1.5, ms=7) for k, name in enumerate(colors)}
    figs = {}

    keys = ppl_keys(records)[:4]

    def draw_ppl(k, ax):
        text, L = keys[k]
        values = []
        for name, recs in _series(records, "perplexity").items():
            pts = [(r["achieved_sparsity"], r["perplexity"]) for r in recs if (r["text"], r["seq_len"]) == (text, L)]
            ax.plot(*zip(*pts), "-", **marks[name], color=colors[name], label=name)
            values += [p for _, p in pts]
        plain_log_axis(ax, values)
        ax.set(title=f"{text}, {L}-token windows", ylabel="perplexity (log scale, lower is better)")

    figs["perplexity.png"] = _panels(len(keys), "Held-out perplexity vs sparsity", draw_ppl)

    tasks = task_names(records)[:4]

    def draw_acc(k, ax):
        chance, items = set(), set()
        for name, recs in _series(records, "accuracy").items():
            pts = [r for r in recs if r["task"] == tasks[k]]
            xs, ys = [r["achieved_sparsity"] for r in pts], [r["accuracy"] for r in pts]
            spans = [wilson_interval(r["accuracy"], r["items"]) for r in pts]
            below_above = [[y - lo for y, (lo, _) in zip(ys, spans)], [hi - y for y, (_, hi) in zip(ys, spans)]]
            ax.errorbar(xs, ys, yerr=below_above, fmt="-", **marks[name], capsize=3, color=colors[name], label=name)
            chance |= {round(c, 6) for c in map(_chance, pts) if c is not None}
            items |= {r["items"] for r in pts}
        for c in sorted(chance):
            ax.axhline(c, color="gray", ls="--", lw=1.2, label=f"chance {c:.3g} (a random guess)")
        n = "/".join(map(str, sorted(items)))
        ax.set(title=f"{tasks[k]}, {n} items\nbars: 95% Wilson interval", ylabel="accuracy (higher is better)",
               ylim=(0, 1))

    figs["accuracy.png"] = _panels(len(tasks), "Task accuracy vs sparsity", draw_acc)

    batches = sorted({r["batch_size"] for r in of(records, "speed")})[:4]

    def draw_speed(k, ax):
        for name, recs in _series(records, "speed").items():
            pts = [r for r in recs if r["batch_size"] == batches[k]]
            xs = [r["achieved_sparsity"] for r in pts]
            ys = [r["speedup"] for r in pts]
            err = [[y - r["speedup_min"] for y, r in zip(ys, pts)], [r["speedup_max"] - y for y, r in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=colors[name],
                        label=f"{name} measured (median, min-max)")
            ax.plot(xs, [r["ideal_speedup"] for r in pts], "--", color=colors[name], alpha=0.7,
                    label=f"{name} ideal (bytes read)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"batch {batches[k]}", ylabel="decode speed-up over dense (x)")

    figs["speedup.png"] = _panels(len(batches), "vLLM decode speed-up vs sparsity", draw_speed)
    return {fname: fig for fname, fig in figs.items() if fig is not None}


def write_plots(out: Path, records: list[dict]) -> list[Path]:
    """OUT/perplexity.png, accuracy.png, speedup.png: those `records` have data for."""
    written = []
    for fname, fig in figures(records).items():
        path = Path(out) / fname
        fig.savefig(path, dpi=120)
        written.append(path)
    return written
