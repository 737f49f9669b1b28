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
    _write_atomic(path, json.dumps({**meta, "results": records}, indent=2) + "\n")
    return path


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
                  f"{s0['dtype']}, medians)", "",
                  "| artifact | sparsity | batch | output tok/s | TTFT ms | TPOT ms | speed-up | ideal | "
                  "fraction of ideal |", "|---" * 9 + "|"]
        for row in speed:
            lines.append(f"| {label(row)} | {row['sparsity']:g} | {row['batch_size']} | "
                         f"{row['output_tokens_per_s']:.1f} | {row['ttft_s'] * 1e3:.1f} | {row['tpot_s'] * 1e3:.2f} | "
                         f"{row['speedup']:.3f} | {row['ideal_speedup']:.3f} | {row['fraction_of_ideal']:.3f} |")
        lines += ["", "Speed-up: dense time per output token ÷ the slice's. Ideal: bytes a decode step reads "
                  "(weights but the embedding table, plus the batch's KV cache at the mean context) for the dense "
                  "model ÷ for the slice. Fraction of ideal: speed-up ÷ ideal.", ""]
    path = Path(out) / "report.md"
    _write_atomic(path, "\n".join(lines) + "\n")
    return path


def _panels(out: Path, n: int, title: str, fname: str, draw) -> list[Path]:
    """A row of `n` plots, draw(k, axes) filling the k-th, saved as OUT/fname; none when n is 0."""
    if n == 0:
        return []
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    for k, ax in enumerate(axes[0]):
        draw(k, ax)
        ax.grid(alpha=0.3)
        ax.set_xlabel("sparsity (achieved, fraction of decoder linear parameters)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(out) / fname
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def write_plots(out: Path, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: plt.get_cmap("tab10")(k % 10) for k, name in enumerate(_series(records))}
    written = []

    keys = ppl_keys(records)[:4]

    def draw_ppl(k, ax):
        text, L = keys[k]
        for name, recs in _series(records, "perplexity").items():
            pts = [(r["achieved_sparsity"], r["perplexity"]) for r in recs if (r["text"], r["seq_len"]) == (text, L)]
            ax.plot(*zip(*pts), "o-", color=colors[name], label=name)
        ax.set_yscale("log")
        ax.set(title=f"{text}, {L}-token windows", ylabel="perplexity (log scale, lower is better)")

    written += _panels(out, len(keys), "Held-out perplexity vs sparsity", "perplexity.png", draw_ppl)

    tasks = task_names(records)[:4]

    def draw_acc(k, ax):
        for name, recs in _series(records, "accuracy").items():
            pts = [(r["achieved_sparsity"], r["accuracy"]) for r in recs if r["task"] == tasks[k]]
            ax.plot(*zip(*pts), "o-", color=colors[name], label=name)
        ax.set(title=tasks[k], ylabel="accuracy (higher is better)", ylim=(0, 1))

    written += _panels(out, len(tasks), "Task accuracy vs sparsity", "accuracy.png", draw_acc)

    batches = sorted({r["batch_size"] for r in of(records, "speed")})[:4]

    def draw_speed(k, ax):
        for name, recs in _series(records, "speed").items():
            pts = [r for r in recs if r["batch_size"] == batches[k]]
            xs = [r["achieved_sparsity"] for r in pts]
            ax.plot(xs, [r["speedup"] for r in pts], "o-", color=colors[name], label=f"{name} measured")
            ax.plot(xs, [r["ideal_speedup"] for r in pts], "--", color=colors[name], alpha=0.7,
                    label=f"{name} ideal (bytes read)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"batch {batches[k]}", ylabel="decode speed-up over dense (x)")

    written += _panels(out, len(batches), "vLLM decode speed-up vs sparsity", "speedup.png", draw_speed)
    return written
