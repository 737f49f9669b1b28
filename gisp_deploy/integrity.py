"""What an artifact names stays inside it, and its bytes are the ones its manifest records (hashed once per machine).

Every path read from an artifact or export (index weight map, manifest keys, side files) goes through `inside`.
`verify_files` checks sha256 digests; a file already verified on this machine, unchanged since (same device,
inode, size, modification and change time: any write or `touch` changes the change time), is not read again, so
a slice keeps loading only the bytes it keeps. The record of verified files lives in the user's cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path, PurePosixPath


class ArtifactError(ValueError):
    """An artifact, export or model directory that cannot be used as it is (gisp_deploy.artifact re-exports it)."""


class IntegrityError(ArtifactError):
    """A file that is not what its manifest says, or a name that leaves its directory."""


CODE_KEYS = ("auto_map",)  # config keys with which transformers would import a model's own .py files


def inside(root: Path, name, what: str, *, links_may_leave: bool = False) -> Path:
    """`root / name`, refused unless `name` is a plain relative path below `root` that, once symlinks are
    followed, stays inside `root`. `links_may_leave`: only the name is checked (a source model in the Hugging
    Face cache links its files to blobs elsewhere; its bytes are then verified by digest)."""
    root = Path(root)
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise IntegrityError(f"{root}: {what} {name!r} is not a file name; the artifact is damaged or crafted, "
                             "refusing it")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts:
        raise IntegrityError(f"{root}: {what} {name!r} points outside the directory; refusing to read it (a "
                             "crafted artifact can name any file on this machine)")
    path = root.joinpath(*parts)
    if links_may_leave:
        return path
    try:
        real, real_root = path.resolve(), root.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise IntegrityError(f"{path}: {what} cannot be resolved ({e}); refusing it") from None
    if real != real_root and real_root not in real.parents:
        raise IntegrityError(f"{path}: {what} is a link to {real}, outside {root}; refusing to read it (replace the "
                             "link by the file itself)")
    return path


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cache_path() -> Path:
    base = os.environ.get("GISP_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gisp-deploy")
    return Path(base) / "verified.json"


def _identity(st: os.stat_result) -> list:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class VerifiedFiles:
    """realpath -> (identity, sha256) of files hashed on this machine; a corrupt or unwritable record is ignored."""

    def __init__(self, path: Path | None = None):
        self.path = path or _cache_path()
        try:
            self.entries = json.loads(self.path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def digest(self, path: Path, use_record: bool = True) -> str:
        real = str(Path(path).resolve())
        ident = _identity(os.stat(real))
        known = self.entries.get(real)
        if use_record and isinstance(known, list) and len(known) == 2 and known[0] == ident:
            return known[1]
        digest = sha256_file(Path(real))
        if _identity(os.stat(real)) == ident:  # not changed while it was read
            self.entries[real] = [ident, digest]
            self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".verified-")
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home: verification still happened, it is only not remembered
            pass


def verify_files(root: Path, digests: dict, what: str, *, links_may_leave: bool = False,
                 use_record: bool = True) -> None:
    """Every file of `digests` ({name: sha256}) exists inside `root` with that digest; refuses the first that
    does not, naming it. `use_record=False` reads every byte even of files verified before."""
    record = VerifiedFiles()
    try:
        for name, want in digests.items():
            path = inside(root, name, what, links_may_leave=links_may_leave)
            if not path.is_file():
                raise IntegrityError(f"{path}: {what} missing; the artifact is incomplete (its manifest lists the "
                                     "file): restore it, or re-run `gisp-deploy prune`")
            if record.digest(path, use_record) != want:
                raise IntegrityError(f"{path}: sha256 differs from the one its manifest records; the file was "
                                     "changed or truncated. Restore it, or re-run `gisp-deploy prune`")
    finally:
        record.save()


def refuse_remote_code(model_dir: Path, allowed: dict | None = None) -> None:
    """Refuse a model directory whose config.json or tokenizer_config.json asks transformers to import its own
    code (`auto_map`): nothing in an artifact runs. `allowed`: {file name: the one auto_map value accepted}
    (gisp-deploy's exports name its own modeling_gisp.py)."""
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(model_dir) / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{f}: unreadable JSON ({e}); the directory is damaged") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{f}: not a JSON object; the directory is damaged or crafted")
        for key in CODE_KEYS:
            if key in data and data[key] != (allowed or {}).get(name):
                raise ArtifactError(f"{f}: `{key}` asks to run code shipped with the model; gisp-deploy never runs "
                                    f"an artifact's code. Remove `{key}` (the supported families need none)")
