"""The artifact directory: source config/tokenizer, dense weights (or a reference), ranking, manifest."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .integrity import ArtifactError, inside, refuse_remote_code, sha256_file, verify_files
from .output import atomic_dir

# families, ranking and safetensors_file (torch) are imported where used: reading a manifest must not import
# torch, so that `gisp-deploy inspect TYPO` answers at once
if TYPE_CHECKING:
    from .families import ModelShape
    from .ranking import Ranking

FORMAT = "gisp-deploy-artifact"
FORMAT_VERSION = 2  # 2: `files` holds the sha256 of every file of the artifact; 1: of the weights and ranking only
MANIFEST = "gisp.json"
RANKING = "ranking.safetensors"
# What load-time corrections (--refit) need: the calibration windows prune scored on, int32 token ids
# [samples, seq_len] and their attention mask (uint8); the moments are recomputed from them at load time.
STATISTICS = "calibration.safetensors"
MAX_STATISTICS_TOKENS = 1 << 24  # bounds a crafted file: 16M tokens (64 MB of ids) is far above any calibration
WEIGHT_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
INDEX_FILE = "model.safetensors.index.json"
# Small files of a model directory that loaders expect next to the weights (config, tokenizer, generation).
# Never code: an artifact carries no .py file (nothing in it runs).
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


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
    """The model's safetensors files (an artifact's ranking and statistics are not weights)."""
    files = sorted(f for f in model_dir.glob(f"*{WEIGHT_SUFFIX}") if f.name not in (RANKING, STATISTICS))
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
    from .safetensors_header import check_header

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


def is_artifact(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def write_artifact(out: Path, source_dir: Path, ranking: Ranking, manifest: dict, *, copy_weights: bool = True,
                   overwrite: bool = False, calibration=None, rank_ordered: bool = False,
                   weights_dir: Path | None = None, progress=None) -> Path:
    """Write config, tokenizer, weights (or their reference), ranking and manifest atomically to `out`;
    `calibration` (a data.Calibration) is stored as the statistics of load-time corrections (STATISTICS).
    `rank_ordered`: the weights and the ranking renumbered so that every slice keeps prefixes (rank_order.py).
    `weights_dir`: where the weight files are, when not in `source_dir` (an artifact that references them).
    `progress(description, total, unit) -> advance(n)` is told of the renumbering, tensor by tensor."""
    source_dir = Path(source_dir)
    weights_dir = source_dir if weights_dir is None else Path(weights_dir)
    weights = weight_files(weights_dir)
    if rank_ordered and not copy_weights:
        raise ArtifactError("a rank-ordered artifact holds its own renumbered weights: drop --no-copy-weights")
    with atomic_dir(out, overwrite, "artifact", is_artifact) as tmp:
        for f in side_files(source_dir):
            shutil.copy2(f, tmp / f.name)
        manifest = dict(manifest)
        if rank_ordered:
            from .rank_order import LAYOUT_KEY, RANK_ORDERED, layer_orders, permuted, reordered_ranking
            from .safetensors_file import ShardFile, rewrite

            orders = layer_orders(ranking)
            total = 0
            for f in weights:
                with ShardFile(f) as shard:
                    total += len(shard.keys())
            advance = progress("renumbering", total, "tensors") if progress else (lambda n: None)

            def renumbered(name, t):
                advance(1)
                return permuted(name, t, orders, ranking.shape.head_dim)
            for f in weights:
                rewrite(f, tmp / f.name, renumbered)
            ranking = reordered_ranking(ranking, orders)
            manifest[LAYOUT_KEY] = RANK_ORDERED
        hashes = {}
        for f in weights + ([weights_dir / INDEX_FILE] if (weights_dir / INDEX_FILE).is_file() else []):
            if copy_weights and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
            hashes[f.name] = sha256_file(tmp / f.name if copy_weights else f)
        ranking.save(tmp / RANKING)
        if calibration is not None:
            manifest["statistics"] = _write_statistics(tmp / STATISTICS, calibration)
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


def _write_statistics(path: Path, calibration) -> dict:
    import torch
    from safetensors.torch import save_file

    ids = calibration.input_ids.to(torch.int32).contiguous()  # [samples, seq_len]
    mask = calibration.attention_mask.to(torch.uint8).contiguous()  # [samples, seq_len]
    save_file({"input_ids": ids, "attention_mask": mask}, str(path))
    return {"file": STATISTICS, "kind": "calibration_windows", "samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]), "sha256": sha256_file(path)}


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict
    shape: ModelShape
    ranking: Ranking

    @functools.cached_property
    def config(self):
        """The transformers config (PretrainedConfig), read on first use: serve's checks need only the shape,
        which config.json gives without importing transformers and torch (ModelShape.from_config_json)."""
        return _auto_config(self.path)

    def config_dict(self, *keys: str) -> dict:
        """The config as a dict: config.json as plain JSON where it states the shape and every one of `keys`
        (no transformers, no torch), else `config.to_dict()`, whose class defaults fill what the file leaves out."""
        from .families import ModelShape

        raw = json.loads((self.path / "config.json").read_text())
        if ModelShape.from_config_json(raw) == self.shape and all(raw.get(k) is not None for k in keys):
            return raw
        return self.config.to_dict()

    @property
    def weights_dir(self) -> Path:
        w = self.manifest["weights"]
        return self.path if w["copied"] else Path(w["source"])

    @property
    def digest(self) -> str:
        """sha256 of the manifest, which holds the digests of every file: pins the whole artifact."""
        return sha256_file(self.path / MANIFEST)

    def statistics(self):
        """(input_ids [N, T] int64, attention_mask [N, T] bool) of the calibration windows the artifact records for
        load-time corrections, or None for an artifact written without them. Untrusted: the file must be the one
        the manifest names with its digest, and dtypes, shapes and token ids are checked before use."""
        st = self.manifest.get("statistics")
        if st is None:
            return None
        from .safetensors_file import ShardFile

        where = self.path / MANIFEST
        if not isinstance(st, dict) or st.get("file") != STATISTICS or st.get("kind") != "calibration_windows":
            raise ArtifactError(f"{where}: `statistics` is not a record of {STATISTICS}; the artifact is damaged")
        path = inside(self.path, STATISTICS, "statistics file")
        if sha256_file(path) != st.get("sha256") or self.manifest.get("files", {}).get(STATISTICS) != st["sha256"]:
            raise ArtifactError(f"{path}: its digest is not the one the manifest records; the artifact is damaged")
        with ShardFile(path) as f:
            if set(f.keys()) != {"input_ids", "attention_mask"}:
                raise ArtifactError(f"{path}: holds {sorted(f.keys())}, not input_ids and attention_mask")
            ids, mask = f.read("input_ids"), f.read("attention_mask")
        return _checked_windows(path, ids, mask, self.config)

    def verify_weights(self, use_record: bool = True) -> None:
        """The weight files (and their index) have the sha256 the manifest records. A file verified on this
        machine and unchanged since is not read again unless `use_record=False`."""
        w = self.manifest["weights"]
        verify_files(self.weights_dir, w["sha256"], "weight file", links_may_leave=not w["copied"],
                     use_record=use_record)
        check_weights_dir(self.weights_dir, links_may_leave=not w["copied"])


def _checked_windows(path: Path, ids, mask, config):
    import torch

    vocab = int(config.vocab_size)
    max_len = int(getattr(config, "max_position_embeddings", 0) or 0)
    problem = None
    if ids.dtype != torch.int32 or mask.dtype != torch.uint8 or ids.dim() != 2 or ids.shape != mask.shape:
        problem = f"input_ids {ids.dtype} {tuple(ids.shape)} / attention_mask {mask.dtype} {tuple(mask.shape)}"
    elif ids.numel() == 0 or ids.numel() > MAX_STATISTICS_TOKENS or (max_len and ids.shape[1] > max_len):
        problem = f"{tuple(ids.shape)} windows (at most {MAX_STATISTICS_TOKENS} tokens of <= {max_len})"
    elif int(ids.min()) < 0 or int(ids.max()) >= vocab or int(mask.max()) > 1:
        problem = f"token ids outside 0..{vocab - 1} or a mask not 0/1"
    if problem:
        raise ArtifactError(f"{path}: {problem}; expected int32 ids and a uint8 mask [samples, seq_len]; the "
                            "artifact is damaged or crafted")
    return ids.long(), mask.bool()


def read_manifest(path: Path) -> dict:
    """The manifest, refused unless it has the fields and types this version reads."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        if not path.is_dir():
            raise ArtifactError(f"{path}: no such artifact directory")
        if (path / "config.json").is_file():
            raise ArtifactError(f"{path}: a model directory, not a gisp-deploy artifact (no {MANIFEST}); pass the "
                                "artifact that `gisp-deploy prune` wrote (an exported slice's widths are in its "
                                "config.json)")
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
    from .families import ModelShape, UnsupportedModelError
    from .ranking import Ranking

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
    try:
        config_json = json.loads((path / "config.json").read_text())
        shape = ModelShape.from_config_json(config_json) if isinstance(config_json, dict) else None
    except UnsupportedModelError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"{path / 'config.json'}: not a readable model config ({e}); the artifact is damaged "
                            "or crafted") from None
    config = None
    if shape is None:  # the config leaves a size to transformers' defaults: only the real config knows it
        config = _auto_config(path)
        shape = ModelShape.from_config(config)
    try:
        ranking = Ranking.load(rf, shape)
    except Exception as e:
        raise ArtifactError(f"{rf}: cannot read the ranking ({e}); the artifact is damaged or crafted") from None
    _check_protected(rf, ranking, manifest)
    art = Artifact(path=path, manifest=manifest, shape=shape, ranking=ranking)
    if config is not None:
        art.__dict__["config"] = config  # already read: what the cached property would read
    if verify and weights:
        art.verify_weights()
    return art


def _auto_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=False)


def _check_protected(rf: Path, ranking: Ranking, manifest: dict) -> None:
    protected = manifest.get("protected_layers") or []
    if not isinstance(protected, list) or not all(isinstance(layer, int) for layer in protected):
        raise ArtifactError(f"{rf.parent / MANIFEST}: protected_layers must be a list of layer numbers")
    import numpy as np

    touched = sorted(set(np.intersect1d(ranking.layer[:ranking.num_covered], protected).tolist()))
    if touched:
        raise ArtifactError(f"{rf}: the ranking removes structures of protected layers {touched}; the artifact is "
                            "damaged or crafted, re-run `gisp-deploy prune`")
