"""vLLM start of a slice against the dense model, on CPU: process start -> first successful /v1/completions.

    python bench/vllm_start_cpu.py ARTIFACT [--sparsity 0.4] [--repeats 2] [--work /tmp/gisp-vllm-start]
        [--dtype float32] [--dense DIR] [--ranked] [--out bench/results/vllm_start_cpu.json]

Three servers (four with --ranked), started in turns (A B C A B C ...), each in a fresh process group on
127.0.0.1:
  serve    `gisp-deploy serve ARTIFACT --sparsity S` (the plugin slices the dense weights as vLLM reads them)
  ranked   the same, on ARTIFACT rewritten rank-ordered once beforehand (`gisp_deploy.reorder`, not timed)
  export   the slice exported once beforehand (`gisp_deploy.export`, not timed), served by vLLM's own server
  dense    the artifact's source model, served by vLLM's own server
vLLM's server is started the way `serve` starts it (gisp_deploy.serving.launch.vllm_main: the distribution's
api_server entry point), with the same arguments for all three: --enforce-eager --max-model-len 256
--kv-cache-memory-bytes 64MiB --dtype DTYPE, and a fixed --served-model-name. Time: from Popen to the first
200 answer of a 1-token completion (polled every 0.25 s). Peak RSS: the process tree's summed RSS, sampled
every 0.25 s (pages shared between processes counted in each). The machine is shared: load average recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
VLLM_ARGS = ["--enforce-eager", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20)]
NAME = "bench"
VLLM_SERVER = [sys.executable, "-c", "from gisp_deploy.serving.launch import vllm_main; vllm_main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completion_ok(port: int) -> bool:
    body = json.dumps({"model": NAME, "prompt": "The", "max_tokens": 1}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status == 200 and bool(json.loads(r.read())["choices"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return False


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def start(argv: list[str], log: Path, timeout: float) -> dict:
    """Run one server until its first completion; stop its process group; the time and peak RSS."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    ps, peak, ready = psutil.Process(proc.pid), 0, None
    port = int(argv[argv.index("--port") + 1])
    try:
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            peak = max(peak, tree_rss(ps))
            if completion_ok(port):
                ready = time.perf_counter() - t0
                peak = max(peak, tree_rss(ps))
                break
            time.sleep(0.25)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this script started
            proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if ready is None:
        raise RuntimeError(f"{argv[:6]}... not ready (exit {proc.returncode}); see {log}:\n"
                           f"{log.read_text(errors='replace')[-3000:]}")
    return {"ready_s": ready, "peak_rss_mb": peak / 2**20, "loadavg_1m": [load_before, os.getloadavg()[0]]}


def spread(values: list[float]) -> dict:
    lo, hi = min(values), max(values)
    return {"median": statistics.median(values), "min": lo, "max": hi, "n": len(values),
            "disagree": hi / lo > 1.25}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default="/tmp/gisp-vllm-start")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--dtype", default="float32", help="vLLM's --dtype, and the export's")
    ap.add_argument("--dense", help="the dense model's directory (default: the artifact's weights)")
    ap.add_argument("--ranked", action="store_true", help="also serve the artifact rewritten rank-ordered")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_start_cpu.json"))
    args = ap.parse_args()
    from gisp_deploy import export
    from gisp_deploy.artifact import load_artifact

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    art = load_artifact(args.artifact)
    exported = work / f"export-{args.sparsity:g}"
    if not exported.is_dir():
        export(art, exported, args.sparsity, dtype=args.dtype)
    ranked = work / "artifact-ranked"
    if args.ranked and not ranked.is_dir():
        from gisp_deploy import reorder

        reorder(art.path, ranked)
    vllm_args = [*VLLM_ARGS, "--dtype", args.dtype]
    dense_dir = Path(args.dense or (art.weights_dir if art.manifest["weights"]["copied"]
                                    else art.manifest["weights"]["source"]))

    def argv(kind: str, port: int) -> list[str]:
        if kind in ("serve", "ranked"):
            return [sys.executable, "-m", "gisp_deploy.cli", "serve", str(art.path if kind == "serve" else ranked),
                    "--sparsity", str(args.sparsity), "--port", str(port), "--served-model-name", NAME, "--",
                    *vllm_args]
        model = exported if kind == "export" else dense_dir
        return [*VLLM_SERVER, "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", NAME, *vllm_args]

    kinds = ["serve", *(["ranked"] if args.ranked else []), "export", "dense"]
    rows = []
    for rep in range(args.repeats):
        for kind in kinds:
            r = {"kind": kind, "repeat": rep, **start(argv(kind, free_port()), work / f"{kind}-{rep}.log",
                                                      args.timeout)}
            rows.append(r)
            print(f"{kind:7s} #{rep}: ready {r['ready_s']:6.1f} s, peak RSS {r['peak_rss_mb']:7.0f} MB, load avg "
                  f"{r['loadavg_1m'][1]:.1f}", flush=True)
    summary = {k: {"ready_s": spread([r["ready_s"] for r in rows if r["kind"] == k]),
                   "peak_rss_mb": spread([r["peak_rss_mb"] for r in rows if r["kind"] == k])} for k in kinds}
    for k in kinds[:-1]:  # each start against the dense start of its own round
        summary[k]["ready_over_dense"] = spread([a["ready_s"] / b["ready_s"] for a, b in
                                                 zip([r for r in rows if r["kind"] == k],
                                                     [r for r in rows if r["kind"] == "dense"])])
    Path(args.out).write_text(json.dumps({
        "command": "python bench/vllm_start_cpu.py " + " ".join(sys.argv[1:]), "artifact": str(art.path),
        "sparsity": args.sparsity, "vllm_args": vllm_args, "cpus": os.cpu_count(),
        "note": "time from Popen to the first 200 /v1/completions; peak = summed RSS of the process tree, sampled",
        "summary": summary, "results": rows}, indent=2))
    for k, v in summary.items():
        ratio = v.get("ready_over_dense")
        print(f"{k:7s} ready {v['ready_s']['median']:6.1f} s ({v['ready_s']['min']:.1f}-{v['ready_s']['max']:.1f})"
              f"{'  vs dense x%.2f (%.2f-%.2f)' % (ratio['median'], ratio['min'], ratio['max']) if ratio else ''}"
              f", peak RSS {v['peak_rss_mb']['median']:6.0f} MB")


if __name__ == "__main__":
    main()
