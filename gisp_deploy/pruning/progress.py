"""A `prune` run's progress next to its --out: what makes a killed run resumable to the same ranking."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..artifact import MANIFEST, ArtifactError
from ..output import write_error, write_failure
from .distributed import Ranks
from .methods import PruneState, Removal

FINISHED = "finished"  # in the progress folder: the id of the artifact its finished ranking is written as
RUN_FILE = "run.json"  # the options that decide the ranking: a resumed run must match them
STATE_FILE = "state.safetensors"


def partial_dir(out: Path) -> Path:
    out = Path(out)
    return out.resolve().parent / f".{out.name}.partial"


def drop_finished_progress(out: Path) -> None:
    """Remove the progress folder of a run that was stopped after its artifact was complete (between the
    artifact's rename and this folder's removal): `out` then carries the id the folder names."""
    marker = partial_dir(out) / FINISHED
    try:
        finished = json.loads((Path(out) / MANIFEST).read_text()).get("run", {}).get("id")
        if finished and marker.read_text().strip() == finished:
            shutil.rmtree(marker.parent, ignore_errors=True)
    except (OSError, ValueError, AttributeError):  # no such artifact or marker: nothing to drop
        return


def save_state(path: Path, state: PruneState) -> None:
    rows = torch.tensor([r[:4] for r in state.removed], dtype=torch.int64).reshape(-1, 4)
    tensors = {"removed": rows, "removed_score": torch.tensor([r.score for r in state.removed], dtype=torch.float64),
               "last_heads": state.last_heads.contiguous(), "last_channels": state.last_channels.contiguous()}
    tmp = path.with_suffix(".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"step": str(state.step)})
        os.replace(tmp, path)  # the previous step's state stays whole until this one is
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_state(path: Path) -> PruneState:
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        step = int((f.metadata() or {})["step"])
    removed = [Removal(*map(int, r), float(s)) for r, s in zip(t["removed"].tolist(), t["removed_score"].tolist())]
    return PruneState(step=step, removed=removed, last_heads=t["last_heads"], last_channels=t["last_channels"])


class RunProgress:
    """The progress folder `.OUT.partial` of one run: created at its first completed step, updated after every
    step, named finished just before the artifact is written, removed once it is."""

    def __init__(self, out: Path, run_key: dict, ranks: Ranks):
        self.dir, self.run_key, self.ranks = partial_dir(out), run_key, ranks

    def resume(self, resume: bool, log=print) -> PruneState | None:
        """The saved state to continue from (None: start at step 0); refuses progress it was not asked to resume,
        or that another set of options made."""
        work = self.dir
        if self.ranks.is_main and work.exists() and not (work / RUN_FILE).exists():  # killed before its first step
            shutil.rmtree(work)
        self.ranks.barrier()
        if not work.exists():
            return None
        if not resume:
            raise ArtifactError(f"an unfinished run left its progress in {work}; pass --resume to continue it, "
                                "or delete that folder to start over")
        saved = json.loads((work / RUN_FILE).read_text())
        diff = sorted(k for k in set(saved) | set(self.run_key) if saved.get(k) != self.run_key.get(k))
        if diff:
            detail = {k: (saved.get(k), self.run_key.get(k)) for k in diff}
            raise ArtifactError(f"--resume: this run differs from the saved one in {detail}; pass the same options, "
                                f"or delete {work} to start over")
        if not (work / STATE_FILE).exists():
            return None
        state = load_state(work / STATE_FILE)
        log(f"resuming from step {state.step} ({len(state.removed)} structures removed)")
        return state

    def checkpoint(self, state: PruneState) -> None:
        """Save the state after a completed step (rank 0); a full disk says what was kept."""
        if not self.ranks.is_main:
            return
        work = self.dir
        try:
            if not work.exists():  # created at the first completed step, so failed starts leave nothing behind
                work.mkdir(parents=True)
                (work / f"{RUN_FILE}.tmp").write_text(json.dumps(self.run_key, indent=2))
                os.replace(work / f"{RUN_FILE}.tmp", work / RUN_FILE)
            save_state(work / STATE_FILE, state)
        except Exception as e:
            if not write_failure(e, work):
                raise
            if (work / STATE_FILE).exists():
                kept = f"progress up to the last completed step is kept in {work}"
                fix = "free some space and rerun the same command with --resume"
            else:
                shutil.rmtree(work, ignore_errors=True)
                kept, fix = "nothing was kept", None
            raise write_error(e, work, kept, work, fix) from None

    def exists(self) -> bool:
        return self.dir.exists()

    def mark_finished(self, run_id: str) -> None:
        """A stop after the artifact's rename leaves this folder to the next run to drop."""
        if self.dir.exists():
            try:
                (self.dir / FINISHED).write_text(run_id)
            except OSError:  # only a clean-up hint: the artifact's write reports a full disk
                pass

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
