"""The artifact directory: source config/tokenizer, dense weights (or a reference), ranking, manifest."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .families import ModelShape
from .ranking import Ranking

FORMAT = "gisp-deploy-artifact"
FORMAT_VERSION = 1
MANIFEST = "gisp.json"
RANKING = "ranking.safetensors"
WEIGHT_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Small files of a model directory that loaders expect next to the weights (config, tokenizer, generation).
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")


class ArtifactError(ValueError):
    pass


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


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_model_dir(model: str) -> Path:
    """A local Hugging Face directory, or a hub name resolved through the local cache / the hub."""
    p = Path(model)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ArtifactError(f"{p}: no config.json; pass a Hugging Face model directory")
        return p
    if p.exists() or model.startswith((".", "/")):
        raise ArtifactError(f"{model}: not a model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                             "*.jinja", "*.tiktoken"]))
    except Exception as e:
        raise ArtifactError(f"{model}: not a local directory, and fetching it from the hub failed "
                            f"({type(e).__name__}); offline, pass the path of a downloaded model directory") from None


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob(f"*{WEIGHT_SUFFIX}"))
    if not files:
        if any(model_dir.glob(f"*{s}") for s in PICKLE_SUFFIXES):
            raise ArtifactError(f"{model_dir}: only pickle checkpoints (.bin/.pt); gisp-deploy never loads pickles. "
                                "Convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))")
        raise ArtifactError(f"{model_dir}: no .safetensors weight files")
    return files


def side_files(model_dir: Path) -> list[Path]:
    skip = {MANIFEST}
    return sorted(f for f in model_dir.iterdir()
                  if f.is_file() and f.name.endswith(SIDE_FILE_SUFFIXES) and f.name not in skip)


@contextmanager
def atomic_dir(final: Path, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces `final` in one rename. A failed write to the
    destination (disk full, no permission) becomes a WriteError; nothing is left at or next to `final`."""
    final = Path(final)
    sweep_stale(final)
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} already exists; choose another --out or pass --overwrite")
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
        if final.exists():
            old = parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if write_failure(e, tmp):
            raise write_error(e, final, f"nothing was written to {final}", tmp) from None
        raise


def write_artifact(out: Path, source_dir: Path, ranking: Ranking, manifest: dict, *, copy_weights: bool = True,
                   overwrite: bool = False) -> Path:
    """Write config, tokenizer, weights (or their reference), ranking and manifest atomically to `out`."""
    source_dir = Path(source_dir)
    weights = weight_files(source_dir)
    with atomic_dir(out, overwrite) as tmp:
        for f in side_files(source_dir):
            shutil.copy2(f, tmp / f.name)
        hashes = {}
        for f in weights:
            if copy_weights:
                shutil.copy2(f, tmp / f.name)
            hashes[f.name] = sha256_file(f)
        ranking.save(tmp / RANKING)
        manifest = dict(manifest)
        manifest.update({
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "unit": ranking.unit, "coverage": round(ranking.coverage, 6),
            "num_structures": len(ranking), "num_covered": ranking.num_covered,
            "total_params": ranking.shape.total_params,
            "weights": {"copied": copy_weights, "source": None if copy_weights else str(source_dir.resolve()),
                        "sha256": hashes},
            "ranking_sha256": sha256_file(tmp / RANKING),
        })
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out)


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict
    shape: ModelShape
    ranking: Ranking
    config: object  # transformers PretrainedConfig

    @property
    def weights_dir(self) -> Path:
        w = self.manifest["weights"]
        return self.path if w["copied"] else Path(w["source"])

    def verify_weights(self) -> None:
        """Check the sha256 of every weight file against the manifest (reads every byte)."""
        for name, digest in self.manifest["weights"]["sha256"].items():
            f = self.weights_dir / name
            if not f.is_file():
                raise ArtifactError(f"{f}: weight file missing; the artifact is incomplete")
            if sha256_file(f) != digest:
                raise ArtifactError(f"{f}: sha256 differs from the one recorded in {MANIFEST}; the file was changed "
                                    "or truncated. Restore it or re-run `gisp-deploy prune`")


def load_artifact(path) -> Artifact:
    from transformers import AutoConfig

    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path}: not a gisp-deploy artifact (no {MANIFEST}); create one with `gisp-deploy prune`")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf}: unreadable manifest ({e}); the artifact is damaged") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf}: format {manifest.get('format')!r} is not {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{mf}: format version {version} is newer than this gisp-deploy reads ({FORMAT_VERSION}); "
                            "upgrade gisp-deploy")
    rf = path / RANKING
    if not rf.is_file():
        raise ArtifactError(f"{rf}: ranking file missing; the artifact is incomplete")
    if sha256_file(rf) != manifest.get("ranking_sha256"):
        raise ArtifactError(f"{rf}: sha256 differs from the manifest; the ranking was changed or truncated")
    config = AutoConfig.from_pretrained(path)
    shape = ModelShape.from_config(config)
    try:
        ranking = Ranking.load(rf, shape)
    except Exception as e:
        raise ArtifactError(f"{rf}: cannot read the ranking ({e})") from None
    return Artifact(path=path, manifest=manifest, shape=shape, ranking=ranking, config=config)
