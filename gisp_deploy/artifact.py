"""The artifact directory: source config/tokenizer, dense weights (or a reference), ranking, manifest."""

from __future__ import annotations

import hashlib
import json
import os
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
    """Yield a temporary sibling directory; on success it replaces `final` in one rename."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} already exists; choose another --out or pass --overwrite")
    parent = final.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
