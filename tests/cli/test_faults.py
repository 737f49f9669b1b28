"""Faults a user meets in the field: a full disk, an unwritable --out, a model without its tokenizer, `prune` killed
at any moment. Each test asserts what the user sees (one line naming the problem and the fix, exit status 2, no
traceback) and that nothing already written is lost. Real processes, real files; no mocks.

A full disk is simulated per process with RLIMIT_FSIZE and SIGXFSZ ignored: every write beyond the limit fails
with EFBIG, exactly where a full disk fails with ENOSPC (both go through the same handling)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gisp_deploy.artifact import MANIFEST, RANKING, load_artifact, write_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.pruning.progress import partial_dir
from tests.factory import CALIB_TEXT, EXAMPLE_HELDOUT, ROOT, make_model_dir

FAST = ["--samples", "4", "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--max-sparsity", "0.5",
        "--device", "cpu"]
WEIGHTS_LIMIT = 1_000_000  # the tiny model's weights are 2.2 MB, its tokenizer 0.55 MB, a progress file ~6 KB


def cli(*args, fsize: int | None = None, preexec=None, timeout=300, env=None):
    def child():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if preexec:
            preexec()
    return subprocess.run([sys.executable, "-m", "gisp_deploy.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=child, cwd=ROOT, env=env)


def error_line(res) -> str:
    """The one `error:` line the user sees; asserts exit status 2 and no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr and "──" not in res.stderr, res.stderr[-3000:]
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def digest(path: Path) -> dict:
    """sha256 of every file under `path` (or of `path`), with its mode: 'untouched' means equal digests."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path) if f != path else f.name): (hashlib.sha256(f.read_bytes()).hexdigest(),
                                                                f.stat().st_mode) for f in files}


def siblings(out: Path) -> list[str]:
    """Everything next to `out` that carries its name: the artifact, its progress and any temporary."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("faults"), "llama-gqa")


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ranking = prune(dense, ModelShape.from_config(dense.config), None,
                    PruneConfig(method="magnitude", max_sparsity=0.6, protect_first=0))
    return write_artifact(tmp_path_factory.mktemp("faults-art") / "art", model, ranking, {"method": "magnitude"})


# ---- a full disk
@pytest.mark.slow
def test_disk_full_while_writing_the_artifact_keeps_the_ranking_for_resume(model, tmp_path):
    out = tmp_path / "art"
    inputs = digest(model), digest(CALIB_TEXT)
    res = cli("prune", model, "--calib", CALIB_TEXT, "--out", out, *FAST, fsize=WEIGHTS_LIMIT)
    line = error_line(res)
    assert f"cannot write {out}: File too large" in line and "file-size limit" in line
    assert f"nothing was written to {out}" in line and "the finished ranking is kept in" in line
    assert "free some space and rerun the same command with --resume" in line
    assert siblings(out) == [".art.partial"]  # no artifact, no temporary; the progress is there
    assert (inputs[0], inputs[1]) == (digest(model), digest(CALIB_TEXT))
    resumed = cli("prune", model, "--calib", CALIB_TEXT, "--out", out, *FAST, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 2" in resumed.stderr and "step 1/2 scoring" not in resumed.stderr  # nothing recomputed
    load_artifact(out).verify_weights()
    assert siblings(out) == ["art"]


@pytest.mark.slow
def test_disk_full_while_saving_progress(model, tmp_path):
    out = tmp_path / "art"
    res = cli("prune", model, "--calib", CALIB_TEXT, "--out", out, *FAST, fsize=3000)  # less than one progress file
    line = error_line(res)
    assert f"cannot write {partial_dir(out)}: File too large" in line and "nothing was kept" in line
    assert "run the command again" in line
    assert siblings(out) == []  # no progress directory that would ask for --resume


@pytest.mark.slow
def test_disk_full_while_replacing_an_artifact_keeps_the_old_one(model, artifact, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    before = digest(out)
    res = cli("prune", model, "--method", "magnitude", "--out", out, "--overwrite", *FAST, fsize=WEIGHTS_LIMIT)
    line = error_line(res)
    assert f"cannot write {out}: File too large" in line and f"nothing was written to {out}" in line
    assert "free some space" in line
    assert digest(out) == before and siblings(out) == ["art"]


@pytest.mark.slow
def test_progress_folder_is_dropped_only_once_its_artifact_is_complete(model, tmp_path):
    """The progress folder goes after the artifact's final rename; a stop between the two leaves it beside a
    complete artifact, and the next run drops it. Progress whose artifact was never completed (here: a disk full
    while replacing an older artifact) stays for --resume."""
    out = tmp_path / "art"
    first = cli("prune", model, "--calib", CALIB_TEXT, "--out", out, *FAST)
    assert first.returncode == 0, first.stderr[-3000:]
    old = digest(out)
    failed = cli("prune", model, "--calib", CALIB_TEXT, "--out", out, "--overwrite", *FAST, "--seed", "1",
                 fsize=WEIGHTS_LIMIT)
    assert "the finished ranking is kept in" in error_line(failed)
    progress = partial_dir(out)
    shutil.copytree(progress, tmp_path / "progress-copy")
    again = cli("prune", model, "--calib", CALIB_TEXT, "--out", out, "--overwrite", *FAST, "--seed", "1")
    assert "pass --resume to continue it" in error_line(again)  # not taken for the older artifact's progress
    assert digest(out) == old and siblings(out) == [".art.partial", "art"]
    resumed = cli("prune", model, "--calib", CALIB_TEXT, "--out", out, "--overwrite", *FAST, "--seed", "1", "--resume")
    assert resumed.returncode == 0 and "step 1/2 scoring" not in resumed.stderr, resumed.stderr[-3000:]
    assert siblings(out) == ["art"]
    # A stop right after the rename: the run had named its artifact in the folder, which is still there.
    shutil.copytree(tmp_path / "progress-copy", progress)
    (progress / "finished").write_text(json.loads((out / MANIFEST).read_text())["run"]["id"])
    new = digest(out)
    res = cli("prune", model, "--calib", CALIB_TEXT, "--out", out, *FAST, "--seed", "1")
    assert "already exists" in error_line(res)
    assert siblings(out) == ["art"] and digest(out) == new


@pytest.mark.slow
def test_disk_full_while_exporting(artifact, tmp_path):
    out = tmp_path / "slice"
    source = digest(artifact)
    res = cli("export", artifact, "--sparsity", "0.4", "--out", out, fsize=WEIGHTS_LIMIT)
    line = error_line(res)
    assert f"cannot write {out}: File too large" in line and f"nothing was written to {out}" in line
    assert "free some space (or choose an --out on another disk)" in line
    assert siblings(out) == []
    ok = cli("export", artifact, "--sparsity", "0.2", "--out", out)
    assert ok.returncode == 0, ok.stderr[-3000:]
    exported = digest(out)
    res = cli("export", artifact, "--sparsity", "0.4", "--out", out, "--overwrite", fsize=WEIGHTS_LIMIT)
    assert "File too large" in error_line(res)
    assert digest(out) == exported and siblings(out) == ["slice"]  # the previous export is intact
    assert digest(artifact) == source


# ---- an output that cannot be written
def _without_dac_override():
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the bounding set before exec, so
    file permissions apply to the child (a plain user is bound by them anyway)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(97)


@pytest.fixture
def read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    probe = subprocess.run([sys.executable, "-c", f"open({str(ro / 'x')!r}, 'w')"], preexec_fn=_without_dac_override,
                           capture_output=True)
    if probe.returncode == 0 or probe.returncode == 97:
        pytest.skip("cannot make a directory unwritable for a child process here")
    yield ro
    ro.chmod(0o755)


def test_unwritable_output_directory(model, artifact, read_only_dir):
    res = cli("prune", model, "--calib", CALIB_TEXT, "--out", read_only_dir / "art", *FAST,
              preexec=_without_dac_override, timeout=120)
    assert error_line(res) == f"error: cannot write in {read_only_dir}: Permission denied; choose a writable --out"
    res = cli("export", artifact, "--sparsity", "0.4", "--out", read_only_dir / "slice", preexec=_without_dac_override,
              timeout=120)
    assert error_line(res) == f"error: cannot write in {read_only_dir}: Permission denied; choose a writable --out"
    assert list(read_only_dir.iterdir()) == []


def test_output_under_a_regular_file(model, artifact, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder was meant")
    for args in (["prune", model, "--calib", CALIB_TEXT, *FAST], ["export", artifact, "--sparsity", "0.4"]):
        res = cli(*args, "--out", blocker / "sub" / "out", timeout=120)
        assert f"{blocker} is a file, not a directory; choose another --out" in error_line(res)
    assert blocker.read_text() == "a file where a folder was meant"


# ---- a model or artifact without its tokenizer
def test_model_without_tokenizer(model, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    res = cli("prune", bare, "--calib", CALIB_TEXT, "--out", tmp_path / "art", *FAST, timeout=120)
    line = error_line(res)
    assert f"{bare}: no tokenizer (tokenizer.json or tokenizer.model, with tokenizer_config.json)" in line
    assert "copy the tokenizer files of the source model into it" in line
    assert siblings(tmp_path / "art") == []


def test_artifact_without_tokenizer(artifact, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(artifact, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    res = cli("eval", bare, "--sparsities", "0.4", "--text", EXAMPLE_HELDOUT, "--max-tokens", "512", timeout=120)
    assert "tokenizer" in error_line(res) and "file missing; the artifact is incomplete" in error_line(res)
    res = cli("eval", bare, "--sparsities", "0.4", "--text", EXAMPLE_HELDOUT, "--max-tokens", "512", "--no-verify",
              timeout=120)  # unverified, the tokenizer's absence is found where it is needed
    assert "no tokenizer" in error_line(res) and "copy the tokenizer files" in error_line(res)
    res = cli("check", bare, "--sparsities", "0.4", "--text", EXAMPLE_HELDOUT, "--max-ppl-ratio", "2", "--json",
              tmp_path / "c.json", timeout=120)
    assert res.returncode == 1 and "FAIL artifact: manifest and file sha256s:" in res.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    assert [r["name"] for r in report["results"] if not r["ok"]] == ["artifact: manifest and file sha256s"]
    assert "tokenizer" in report["results"][0]["message"]


def _wait(proc, condition, timeout=120.0) -> bool:
    """Poll every millisecond until `condition()` holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.001)
    return False


def _columns(art: Path) -> tuple[dict, dict]:
    """The ranking's columns as raw bytes, and its metadata. (The file itself is not byte-reproducible:
    safetensors writes the metadata keys in hash-map order, which changes from process to process.)"""
    with safe_open(str(art / RANKING), framework="pt") as f:
        return ({k: (str(f.get_tensor(k).dtype), f.get_tensor(k).numpy().tobytes()) for k in f.keys()},
                f.metadata())


def _complete(out: Path, ranking: tuple[dict, dict]) -> None:
    art = load_artifact(out)  # manifest, ranking sha256
    art.verify_weights()
    assert _columns(out) == ranking  # every column byte-identical to the uninterrupted run's


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path):
    """Five kills at seeded random moments (start-up, between and during steps, while the artifact is written),
    each followed by --resume: the ranking is byte-identical to an uninterrupted run, and --out is at every
    moment either absent or a complete artifact. The weights (35 MB) take ~0.1 s to write: a window to hit."""
    model = make_model_dir(tmp_path, "llama-gqa", hidden_size=512)
    # steps long enough (~0.5 s) that a kill "between steps" (up to 0.1 s after one is saved) lands before the next
    args = ["prune", model, "--calib", CALIB_TEXT, *FAST, "--steps", "4", "--samples", "32", "--seq-len", "64"]
    ref = cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    ranking = _columns(tmp_path / "ref")
    out = tmp_path / "art"
    state = partial_dir(out) / "state.safetensors"
    writing = lambda: any(p.name.startswith(".art.tmp-") for p in tmp_path.iterdir())  # noqa: E731
    kills = []
    for seed, phase in enumerate(["start-up", "steps", "steps", "write", "write"]):
        rng = random.Random(seed)
        resume = ["--resume"] if kills else []
        proc = subprocess.Popen([sys.executable, "-m", "gisp_deploy.cli", *map(str, args), "--out", str(out),
                                 *resume], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        if phase == "start-up":
            # a random moment of start-up, at the latest when the first step is saved: a fast machine would
            # otherwise get past steps before the kill, leaving too few for the kills that follow
            hit = _wait(proc, lambda t=time.monotonic() + rng.uniform(0.5, 3.0): time.monotonic() > t or state.exists())
        elif phase == "steps":
            seen = state.stat().st_mtime_ns if state.exists() else None
            hit = _wait(proc, lambda: state.exists() and state.stat().st_mtime_ns != seen)
            time.sleep(rng.uniform(0, 0.1))
        else:
            hit = _wait(proc, writing)
            time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills.append((phase, hit and proc.returncode == -signal.SIGKILL, out.exists()))
        if out.exists():  # the kill came after the final rename: then it is whole
            _complete(out, ranking)
            break
    assert all(killed for _, killed, _ in kills), kills
    assert any(phase == "write" and not done for phase, _, done in kills), f"no kill landed mid-write: {kills}"
    if not out.exists():
        assert writing()  # what the killed writers left, hidden next to --out
        resumed = cli(*args, "--out", out, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _complete(out, ranking)
        assert siblings(out) == ["art"]  # the killed writers' temporaries were swept, the progress removed
    manifests = [json.loads((p / MANIFEST).read_text()) for p in (out, tmp_path / "ref")]
    for m in manifests:
        del m["ranking_sha256"], m["run"]  # the sha256 of the file (see _columns); timings
    assert manifests[0] == manifests[1]


def test_writer_killed_while_replacing_an_artifact(artifact, model, tmp_path):
    """`--overwrite` moves the old artifact aside just before renaming the new one into place. A writer killed
    between the two renames leaves no artifact under the name, the old one aside: the next write puts it back."""
    out = tmp_path / "art"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shutil.copytree(artifact, tmp_path / f".art.old-{dead.pid}")
    (tmp_path / f".art.tmp-{dead.pid}-x").mkdir()  # and its half-written new one
    before = digest(tmp_path / f".art.old-{dead.pid}")
    res = cli("prune", model, "--method", "magnitude", "--out", out, *FAST, timeout=120)
    assert "already exists" in error_line(res)  # restored, hence not overwritten without --overwrite
    assert digest(out) == before and siblings(out) == ["art"]


def test_prune_never_destroys_its_source_or_other_data(model, tmp_path):
    """--out on the source, on a folder holding it, inside it, or on a folder that is not an artifact (with
    --overwrite): refused before any work, the data untouched."""
    src = tmp_path / "models" / "m"
    shutil.copytree(model, src)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    before = digest(src)
    for out, message in ((src, "is or holds"), (tmp_path / "models", "is or holds"), (src / "art", "lies inside"),
                         (tmp_path / "notes", "is not a gisp-deploy artifact")):
        res = cli("prune", src, "--method", "magnitude", "--out", out, "--overwrite", *FAST, timeout=120)
        assert res.returncode == 2 and message in error_line(res), res.stderr[-2000:]
    assert digest(src) == before and (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert not (src / "art").exists()


def test_two_runs_to_one_out_are_serialised(model, tmp_path):
    out = tmp_path / "art"
    # long enough (~10 s) that the second run, ~5 s of start-up behind, finds it writing
    args = ["prune", model, "--calib", CALIB_TEXT, *FAST, "--steps", "10", "--samples", "128", "--seq-len", "256"]
    first = subprocess.Popen([sys.executable, "-m", "gisp_deploy.cli", *map(str, args), "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    owner = tmp_path / ".art.lock.owner"
    assert _wait(first, owner.exists)
    second = cli(*args, "--out", out, timeout=120)
    assert second.returncode == 2 and "is being written by gisp-deploy (pid" in error_line(second)
    assert first.poll() is None  # the refusal came while the first run was writing
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    load_artifact(out).verify_weights()
    assert siblings(out) == ["art"]  # no lock, progress or temporary left
