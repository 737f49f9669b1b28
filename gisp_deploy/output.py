"""Writing a directory safely: in a hidden sibling renamed into place, flushed to disk, one writer at a time, and
never over data the command did not create. A failed write says what it left and how to fix it."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .integrity import ArtifactError


class WriteError(ArtifactError):
    """Writing failed for a reason of the destination (disk full, file-size limit, no permission); `cause` is
    the first part of the message ("cannot write X: No space left on device (the disk is full)")."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause or message


WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "the file-size limit of the disk or of `ulimit -f` was hit",
                errno.EACCES: "no permission to write there", errno.EPERM: "no permission to write there",
                errno.EROFS: "the file system is read-only", errno.EIO: "an I/O error"}


def write_failure(e: BaseException, within: Path | None = None) -> tuple[int, str] | None:
    """(errno, what it means) when `e` is a failed write that the user fixes at the destination, else None.
    A full disk or a size limit always is; a permission or I/O error only on a file under `within` (else it may
    be the source that could not be read). safetensors reports write errors as SafetensorError("... I/O error:
    File too large (os error 27)")."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None and type(e).__name__ == "SafetensorError":
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return code, WRITE_ERRNOS[code]
    name = getattr(e, "filename", None)
    if code in WRITE_ERRNOS and within is not None and name and str(Path(name).resolve()).startswith(
            str(Path(within).resolve())):
        return code, WRITE_ERRNOS[code]
    return None


def write_error(e: BaseException, target: Path, consequence: str, within: Path | None = None,
                fix: str | None = None) -> WriteError:
    """A one-line WriteError for a failed write to `target`: the cause, what it left, and the fix."""
    code, meaning = write_failure(e, within)
    cause = f"cannot write {target}: {os.strerror(code)} ({meaning})"
    if fix is None:
        fix = ("choose a writable --out" if code in (errno.EACCES, errno.EPERM, errno.EROFS)
               else "free some space (or choose an --out on another disk) and run the command again")
    return WriteError(f"{cause}; {consequence}; {fix}", cause)


def ensure_writable_parent(final: Path) -> None:
    """Fail early, before any work, when nothing can be written next to `final`: probes its parent, or the
    nearest ancestor that exists (which then must allow creating the parent); creates nothing."""
    parent = Path(final).resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ArtifactError(f"cannot write {final}: {probe} is a file, not a directory; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        if probe != parent:  # what fails is creating the missing folders, not writing where they would be
            raise ArtifactError(f"cannot write {final}: {parent} does not exist and cannot be created in {probe} "
                                f"({e.strerror}); choose another --out") from None
        raise ArtifactError(f"cannot write in {probe}: {e.strerror}; choose a writable --out") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(final: Path) -> None:
    """Clear what a writer of `final` killed mid-way (SIGKILL, power loss) left next to it: its temporary
    directory is removed; the previous version it had moved aside to replace is put back if `final` is missing."""
    final = Path(final)
    parent = final.resolve().parent
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        m = re.fullmatch(re.escape(f".{final.name}.") + r"(tmp|old)-(\d+)(-.*)?", p.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(parent / final.name):
            os.rename(p, parent / final.name)
        else:
            shutil.rmtree(p, ignore_errors=True)


def refuse_destination(out: Path, sources, overwrite: bool, kind: str, is_own) -> None:
    """Refuse, before any work, an --out whose writing would destroy what the command did not create: one of
    its `sources`, a directory holding one, or (with --overwrite) anything `is_own` does not recognise as an
    earlier `kind` of its own."""
    target = Path(out).resolve()
    for src in sources:
        src = Path(src).resolve()
        if target == src or target in src.parents:
            raise ArtifactError(f"--out {out} is or holds {src}, which this command reads: writing it would destroy "
                                "it; choose another --out")
        if src in target.parents:
            raise ArtifactError(f"--out {out} lies inside {src}, which this command reads; choose another --out")
    if overwrite and target.is_dir() and not is_own(target):
        raise ArtifactError(f"--out {out} exists and is not a gisp-deploy {kind}: --overwrite replaces only an earlier "
                            f"{kind}, never other data; choose another --out")


@contextmanager
def output_lock(out: Path):
    """Hold `out` for one writer at a time (a lock file next to it); a second writer is told who holds it."""
    from filelock import FileLock, Timeout

    ensure_writable_parent(out)
    parent = Path(out).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot write next to {out}: {e.strerror}; choose a writable --out") from None
    lock, owner = parent / f".{Path(out).name}.lock", parent / f".{Path(out).name}.lock.owner"
    held = FileLock(str(lock))
    try:
        held.acquire(timeout=0)
    except Timeout:
        who = owner.read_text().strip() if owner.is_file() else "another process"
        raise ArtifactError(f"{out} is being written by {who}; wait for it to finish, or choose another --out") \
            from None
    try:
        owner.write_text(f"gisp-deploy (pid {os.getpid()})\n")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)  # while still held: a writer waiting on it would find no lock, not a stale one
        held.release()


def _fsync_tree(root: Path) -> None:
    """Everything under `root` on disk before the rename that publishes it, every file with the usual mode
    (some writers, safetensors among them, create files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, names in os.walk(root):
        for name in names:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path, overwrite: bool, kind: str, is_own):
    """Yield a temporary sibling directory; on success it replaces `final` in one rename. A failed write to the
    destination (disk full, no permission) becomes a WriteError; nothing is left at or next to `final`. Only an
    earlier `kind` of gisp-deploy's is ever replaced."""
    final = Path(final)
    sweep_stale(final)
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} already exists; choose another --out or pass --overwrite")
    refuse_destination(final, (), overwrite, kind, is_own)
    ensure_writable_parent(final)
    parent = final.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except OSError as e:
        raise ArtifactError(f"cannot write next to {final}: {e.strerror}; choose a writable --out") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if write_failure(e, tmp):
            raise write_error(e, final, f"nothing was written to {final}", tmp) from None
        raise
