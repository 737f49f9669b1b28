"""The artifact directory: source config/tokenizer, dense weights (or a reference), ranking, manifest."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .families import ModelShape
from .integrity import ArtifactError, inside, refuse_remote_code, sha256_file, verify_files
from .ranking import Ranking
from .safetensors_file import check_header

FORMAT = "gisp-deploy-artifact"
FORMAT_VERSION = 2  # 2: `files` holds the sha256 of every file of the artifact; 1: of the weights and ranking only
MANIFEST = "gisp.json"
RANKING = "ranking.safetensors"
WEIGHT_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
INDEX_FILE = "model.safetensors.index.json"
# Small files of a model directory that loaders expect next to the weights (config, tokenizer, generation).
# Never code: an artifact carries no .py file (nothing in it runs).
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


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
        if any(any(model_dir.glob(f"*{s}")) for s in PICKLE_SUFFIXES):
            raise ArtifactError(f"{model_dir}: only pickle checkpoints (.bin/.pt); gisp-deploy never loads pickles. "
                                "Convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))")
        raise ArtifactError(f"{model_dir}: no .safetensors weight files")
    return files


def check_weights_dir(model_dir: Path, links_may_leave: bool = False) -> None:
    """Before anything else reads a directory's weights: safetensors only, every shard its index names inside it,
    and every shard's header sound. `links_may_leave`: a source model whose files link elsewhere (the Hugging
    Face cache), whose names are still checked."""
    for f in weight_files(model_dir):  # refuses pickle-only checkpoints
        check_header(inside(Path(model_dir), f.name, "weight file", links_may_leave=links_may_leave))
    index = Path(model_dir) / INDEX_FILE
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ArtifactError(f"{index}: no weight_map of tensor -> file names; the index is damaged") from None
        for name in sorted(names, key=str):
            inside(Path(model_dir), name, "weight file named in the index", links_may_leave=links_may_leave)


def side_files(model_dir: Path) -> list[Path]:
    skip = {MANIFEST}
    return sorted(f for f in model_dir.iterdir()
                  if f.is_file() and f.name.endswith(SIDE_FILE_SUFFIXES) and f.name not in skip)


KINDS = {"artifact": lambda d: (d / MANIFEST).is_file(),
         "export": lambda d: (d / "config.json").is_file() and "gisp_layers" in (d / "config.json").read_text()}


def refuse_destination(out: Path, sources, overwrite: bool, kind: str) -> None:
    """Refuse, before any work, an --out whose writing would destroy what the command did not create: one of
    its `sources`, a directory holding one, or (with --overwrite) anything but an earlier `kind` of its own."""
    target = Path(out).resolve()
    for src in sources:
        src = Path(src).resolve()
        if target == src or target in src.parents:
            raise ArtifactError(f"--out {out} is or holds {src}, which this command reads: writing it would destroy "
                                "it; choose another --out")
        if src in target.parents:
            raise ArtifactError(f"--out {out} lies inside {src}, which this command reads; choose another --out")
    if overwrite and target.is_dir() and not KINDS[kind](target):
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
def atomic_dir(final: Path, overwrite: bool = False, kind: str = "artifact"):
    """Yield a temporary sibling directory; on success it replaces `final` in one rename. A failed write to the
    destination (disk full, no permission) becomes a WriteError; nothing is left at or next to `final`. Only an
    earlier `kind` of gisp-deploy's is ever replaced."""
    final = Path(final)
    sweep_stale(final)
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} already exists; choose another --out or pass --overwrite")
    refuse_destination(final, (), overwrite, kind)
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


def write_artifact(out: Path, source_dir: Path, ranking: Ranking, manifest: dict, *, copy_weights: bool = True,
                   overwrite: bool = False) -> Path:
    """Write config, tokenizer, weights (or their reference), ranking and manifest atomically to `out`."""
    source_dir = Path(source_dir)
    weights = weight_files(source_dir)
    with atomic_dir(out, overwrite) as tmp:
        for f in side_files(source_dir):
            shutil.copy2(f, tmp / f.name)
        hashes = {}
        for f in weights + ([source_dir / INDEX_FILE] if (source_dir / INDEX_FILE).is_file() else []):
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
            "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()},
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

    @property
    def digest(self) -> str:
        """sha256 of the manifest, which holds the digests of every file: pins the whole artifact."""
        return sha256_file(self.path / MANIFEST)

    def verify_weights(self, use_record: bool = True) -> None:
        """The weight files (and their index) have the sha256 the manifest records. A file verified on this
        machine and unchanged since is not read again unless `use_record=False`."""
        w = self.manifest["weights"]
        verify_files(self.weights_dir, w["sha256"], "weight file", links_may_leave=not w["copied"],
                     use_record=use_record)
        check_weights_dir(self.weights_dir, links_may_leave=not w["copied"])


def read_manifest(path: Path) -> dict:
    """The manifest, refused unless it has the fields and types this version reads."""
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path}: not a gisp-deploy artifact (no {MANIFEST}); create one with `gisp-deploy prune`")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf}: unreadable manifest ({e}); the artifact is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{mf}: format {got!r} is not {FORMAT!r}; not a gisp-deploy artifact")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{mf}: format version {version} is newer than this gisp-deploy reads ({FORMAT_VERSION}); "
                            "upgrade gisp-deploy")
    w = manifest.get("weights")
    ok = isinstance(w, dict) and isinstance(w.get("copied"), bool) and isinstance(w.get("sha256"), dict) and \
        all(isinstance(v, str) for v in w["sha256"].values()) and (w["copied"] or isinstance(w.get("source"), str)) \
        and isinstance(manifest.get("ranking_sha256"), str) and isinstance(manifest.get("files", {}), dict)
    if not ok:
        raise ArtifactError(f"{mf}: the manifest lacks `weights` (copied, sha256, source) or `ranking_sha256`, or "
                            "gives them the wrong type; the artifact is damaged or crafted")
    return manifest


_UNVERIFIED_SAID: set = set()


def _verify_metadata(path: Path, manifest: dict) -> None:
    """Every file but the weights has the digest the manifest records; a version 1 artifact records only the
    ranking's, which is then all that is checked (said once)."""
    files = manifest.get("files")
    if files is None:
        verify_files(path, {RANKING: manifest["ranking_sha256"]}, "ranking")
        if str(path) not in _UNVERIFIED_SAID:
            _UNVERIFIED_SAID.add(str(path))
            sys.stderr.write(f"warning: {path} is a format-1 artifact: its config, tokenizer and index are not "
                             "covered by its manifest and were not verified (re-run `gisp-deploy prune` to cover "
                             "them)\n")
        return
    weights = set(manifest["weights"]["sha256"]) if manifest["weights"]["copied"] else set()
    verify_files(path, {n: d for n, d in files.items() if n not in weights}, "file")
    if RANKING not in files or files[RANKING] != manifest["ranking_sha256"]:
        raise ArtifactError(f"{path / MANIFEST}: the ranking's digest is missing from `files`; the artifact is damaged")


def load_artifact(path, *, verify: bool = True, weights: bool = True, expect_digest: str | None = None) -> Artifact:
    """The artifact at `path`, its manifest, shape, ranking and config. Everything it names must lie inside it;
    with `verify` (default) every file it consists of must have the digest its manifest records, the weights
    too when `weights` (once per machine: see integrity.py). `expect_digest` pins the manifest itself."""
    from transformers import AutoConfig

    path = Path(path)
    manifest = read_manifest(path)
    if expect_digest is not None and sha256_file(path / MANIFEST) != expect_digest.lower().removeprefix("sha256:"):
        raise ArtifactError(f"{path / MANIFEST}: digest {sha256_file(path / MANIFEST)} is not the expected "
                            f"{expect_digest}; this is not the artifact that was checked")
    names = list(manifest.get("files", {})) + (list(manifest["weights"]["sha256"]) if manifest["weights"]["copied"]
                                               else [])
    for name in names:
        inside(path, name, "file named in the manifest")
    for name in manifest["weights"]["sha256"]:
        inside(Path(manifest["weights"].get("source") or path), name, "weight file named in the manifest",
               links_may_leave=not manifest["weights"]["copied"])
    for f in sorted(path.iterdir()):  # nothing in it may lead out of it, named in the manifest or not
        inside(path, f.name, "file")
    if verify:
        _verify_metadata(path, manifest)
    refuse_remote_code(path)
    rf = path / RANKING
    if not rf.is_file():
        raise ArtifactError(f"{rf}: ranking file missing; the artifact is incomplete")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    shape = ModelShape.from_config(config)
    try:
        ranking = Ranking.load(rf, shape)
    except Exception as e:
        raise ArtifactError(f"{rf}: cannot read the ranking ({e}); the artifact is damaged or crafted") from None
    _check_protected(rf, ranking, manifest)
    art = Artifact(path=path, manifest=manifest, shape=shape, ranking=ranking, config=config)
    if verify and weights:
        art.verify_weights()
    return art


def _check_protected(rf: Path, ranking: Ranking, manifest: dict) -> None:
    protected = manifest.get("protected_layers") or []
    if not isinstance(protected, list) or not all(isinstance(layer, int) for layer in protected):
        raise ArtifactError(f"{rf.parent / MANIFEST}: protected_layers must be a list of layer numbers")
    import numpy as np

    touched = sorted(set(np.intersect1d(ranking.layer[:ranking.num_covered], protected).tolist()))
    if touched:
        raise ArtifactError(f"{rf}: the ranking removes structures of protected layers {touched}; the artifact is "
                            "damaged or crafted, re-run `gisp-deploy prune`")
