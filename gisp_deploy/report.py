"""What `gisp-deploy bench` writes: results.json, report.md and PNG plots, from its list of records."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def environment() -> dict:
    import torch
    import transformers

    from . import __version__

    env = {"gisp_deploy": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu": _cpu_name(), "cpus": len(os.sched_getaffinity(0)),
           "torch_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        from importlib.metadata import version

        from .serve import vllm_distribution

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


def write_json(out: Path, records: list[dict], meta: dict) -> Path:
    path = Path(out) / "results.json"
    _write_atomic(path, json.dumps({**meta, "results": records}, indent=2) + "\n")
    return path


def label(rec: dict) -> str:
    return f"{rec['name']} ({rec['method']})"


def _series(records):
    """{artifact label: [records in sparsity order]}, in the order the artifacts were given."""
    out: dict[str, list] = {}
    for r in records:
        out.setdefault(label(r), []).append(r)
    return out


def _ppl_keys(records):
    keys = []
    for r in records:
        for p in r["perplexity"]:
            if (p["text"], p["seq_len"]) not in keys:
                keys.append((p["text"], p["seq_len"]))
    return keys


def _ppl(rec, text, seq_len):
    return next((p["perplexity"] for p in rec["perplexity"] if p["text"] == text and p["seq_len"] == seq_len), None)


def _speed_rows(rec):
    return {r["batch_size"]: r for r in (rec.get("speed") or {}).get("results", [])}


def _mb(n):
    return f"{n / 2**20:,.1f}"


def write_markdown(out: Path, records: list[dict], meta: dict) -> Path:
    series = _series(records)
    sps = sorted({r["sparsity"] for r in records})
    lines = [f"# gisp-deploy bench", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['environment']['cpu']} ({meta['environment']['cpus']} CPUs), "
             f"GPU: {meta['environment']['gpu'] or 'none'}; torch {meta['environment']['torch']}, "
             f"transformers {meta['environment']['transformers']}, vLLM {meta['environment']['vllm'] or '-'}.",
             f"Quality in {meta['quality_dtype']} on {meta['device']}; bytes at {meta['serve_dtype']}.", ""]
    for text, L in _ppl_keys(records):
        lines += [f"## Perplexity, {text}, {L}-token windows", "",
                  "| artifact | " + " | ".join(f"{s:g}" for s in sps) + " |", "|---" * (len(sps) + 1) + "|"]
        for name, recs in series.items():
            by = {r["sparsity"]: _ppl(r, text, L) for r in recs}
            lines.append(f"| {name} | " + " | ".join(f"{by[s]:.2f}" if by.get(s) else "" for s in sps) + " |")
        lines.append("")
    tasks = sorted({t["task"] for r in records for t in r["tasks"]})
    for task in tasks:
        lines += [f"## Task accuracy, {task}", "", "| artifact | " + " | ".join(f"{s:g}" for s in sps) + " |",
                  "|---" * (len(sps) + 1) + "|"]
        for name, recs in series.items():
            by = {r["sparsity"]: next((t for t in r["tasks"] if t["task"] == task), None) for r in recs}
            lines.append(f"| {name} | " + " | ".join(
                f"{by[s]['accuracy']:.3f}" if by.get(s) else "" for s in sps) + " |")
        lines.append("")
    lines += ["## Size and load time", "", "| artifact | sparsity | achieved | decoder params | parameters | "
              "weights MiB | KV bytes/token | load s |", "|---" * 8 + "|"]
    for name, recs in series.items():
        for r in recs:
            lines.append(f"| {name} | {r['sparsity']:g} | {r['achieved_sparsity']:.4f} | {r['decoder_params']:,} | "
                         f"{r['parameters']:,} | {_mb(r['weight_bytes'])} | {r['kv_bytes_per_token']:,} | "
                         f"{r['load_s']:.2f} |")
    lines.append("")
    speed_recs = [r for r in records if r.get("speed")]
    if speed_recs:
        s0 = speed_recs[0]["speed"]
        lines += [f"## Decode speed on vLLM ({s0['prompt_len']}-token prompts, {s0['gen_len']} new tokens, "
                  f"{s0['dtype']}, medians)", "",
                  "| artifact | sparsity | batch | output tok/s | TTFT ms | TPOT ms | speed-up | ideal | "
                  "fraction of ideal |", "|---" * 9 + "|"]
        for r in speed_recs:
            for b, row in _speed_rows(r).items():
                lines.append(f"| {label(r)} | {r['sparsity']:g} | {b} | {row['output_tokens_per_s']:.1f} | "
                             f"{row['ttft_s'] * 1e3:.1f} | {row['tpot_s'] * 1e3:.2f} | {row['speedup']:.3f} | "
                             f"{row['ideal_speedup']:.3f} | {row['fraction_of_ideal']:.3f} |")
        lines += ["", "Speed-up: dense time per output token ÷ the slice's. Ideal: bytes a decode step reads "
                  "(weights but the embedding table, plus the batch's KV cache at the mean context) for the dense "
                  "model ÷ for the slice. Fraction of ideal: speed-up ÷ ideal.", ""]
    path = Path(out) / "report.md"
    _write_atomic(path, "\n".join(lines) + "\n")
    return path


def write_plots(out: Path, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(records)
    colors = {name: plt.get_cmap("tab10")(k % 10) for k, name in enumerate(series)}
    written = []

    def panels(n, title, fname, draw):
        if n == 0:
            return
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
        written.append(path)

    keys = _ppl_keys(records)[:4]

    def draw_ppl(k, ax):
        text, L = keys[k]
        for name, recs in series.items():
            pts = [(r["achieved_sparsity"], _ppl(r, text, L)) for r in recs if _ppl(r, text, L)]
            ax.plot(*zip(*pts), "o-", color=colors[name], label=name)
        ax.set_yscale("log")
        ax.set(title=f"{text}, {L}-token windows", ylabel="perplexity (log scale, lower is better)")

    panels(len(keys), "Held-out perplexity vs sparsity", "perplexity.png", draw_ppl)

    tasks = sorted({t["task"] for r in records for t in r["tasks"]})[:4]

    def draw_acc(k, ax):
        for name, recs in series.items():
            pts = [(r["achieved_sparsity"], t["accuracy"]) for r in recs for t in r["tasks"] if t["task"] == tasks[k]]
            ax.plot(*zip(*pts), "o-", color=colors[name], label=name)
        ax.set(title=tasks[k], ylabel="accuracy (higher is better)", ylim=(0, 1))

    panels(len(tasks), "Task accuracy vs sparsity", "accuracy.png", draw_acc)

    batches = sorted({b for r in records for b in _speed_rows(r)})[:4]

    def draw_speed(k, ax):
        b = batches[k]
        for name, recs in series.items():
            pts = [(r["achieved_sparsity"], _speed_rows(r)[b]) for r in recs if b in _speed_rows(r)]
            xs = [x for x, _ in pts]
            ax.plot(xs, [p["speedup"] for _, p in pts], "o-", color=colors[name], label=f"{name} measured")
            ax.plot(xs, [p["ideal_speedup"] for _, p in pts], "--", color=colors[name], alpha=0.7,
                    label=f"{name} ideal (bytes read)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"batch {b}", ylabel="decode speed-up over dense (x)")

    panels(len(batches), "vLLM decode speed-up vs sparsity", "speedup.png", draw_speed)
    return written
