"""An existing artifact rewritten in the rank-ordered layout: the same slices, each one a prefix of the weights."""

from __future__ import annotations

import types
from pathlib import Path

from ..artifact import ArtifactError, load_artifact, write_artifact
from ..output import output_lock
from ..rank_order import LAYOUT_KEY, RANK_ORDERED

RECOMPUTED = ("format", "format_version", "weights", "files", "ranking_sha256", "statistics", LAYOUT_KEY)


def reorder(artifact, out, *, overwrite: bool = False, progress=None) -> Path:
    """`gisp-deploy reorder` from Python: write `artifact` (a path) to `out` with every layer's heads and channels
    renumbered in the order its ranking keeps them (gisp_deploy/rank_order.py). Every slice of the new artifact
    computes what the same slice of the old one does; the manifest records `reordered_from` (the old manifest's
    sha256) and keeps everything else the run recorded. `progress(description, total, unit) -> advance(n)`
    sees the tensors as they are rewritten."""
    art = load_artifact(artifact)  # every byte verified before it is rewritten
    out = Path(out)
    if out.resolve() == art.path.resolve():
        raise ArtifactError(f"--out {out} is the artifact itself; write the rank-ordered copy somewhere else")
    if art.manifest.get(LAYOUT_KEY) == RANK_ORDERED:
        raise ArtifactError(f"{art.path} is rank-ordered already; its slices load as prefixes as it is")
    windows = art.statistics()
    calibration = None if windows is None else types.SimpleNamespace(input_ids=windows[0], attention_mask=windows[1])
    manifest = {k: v for k, v in art.manifest.items() if k not in RECOMPUTED}
    manifest["reordered_from"] = art.digest
    with output_lock(out):
        return write_artifact(out, art.path, art.ranking, manifest, overwrite=overwrite, calibration=calibration,
                              rank_ordered=True, weights_dir=art.weights_dir, progress=progress)
