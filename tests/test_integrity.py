"""An artifact is untrusted input: crafted artifacts, each run through `load`, `eval`, `export`, serve's
pre-flight (`check_slice`, `slice_summary`) and `check`. Every one is refused with one line, nothing outside it is read
(tripwire files whose access time would change), no code runs, nothing is written outside.

Most crafted artifacts are "resealed": their manifest is rewritten to match the changed files, as an attacker
who hands out a whole artifact would, so that only containment and validation can catch them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import gisp_deploy
from gisp_deploy.artifact import MANIFEST, RANKING, ArtifactError, load_artifact, write_artifact
from gisp_deploy.families import ModelShape
from gisp_deploy.integrity import sha256_file
from gisp_deploy.pruning.methods import PruneConfig, prune
from gisp_deploy.ranking import RemovalCounter
from gisp_deploy.serving.summary import check_slice, slice_summary
from tests.factory import EXAMPLE_HELDOUT, ROOT, make_model_dir

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("integrity")
    model_dir = make_model_dir(root, "llama-gqa")
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    ranking = prune(None, shape, None, PruneConfig(method="random", max_sparsity=0.45, protect_first=0.25,
                                                   protect_last=1))
    return write_artifact(root / "good", model_dir, ranking, {"method": "random", "protected_layers": [0, 3]})


def reseal(art: Path) -> None:
    """Rewrite the manifest's digests to match the files as they are now."""
    m = json.loads((art / MANIFEST).read_text())
    files = {f.name: sha256_file(f) for f in sorted(art.iterdir()) if f.is_file() and f.name != MANIFEST}
    m["files"] = {**{k: v for k, v in m["files"].items() if k not in files and k.startswith("..")}, **files}
    m["weights"]["sha256"] = {k: files[k] for k in m["weights"]["sha256"] if k in files}
    m["ranking_sha256"] = files[RANKING]
    (art / MANIFEST).write_text(json.dumps(m))


def _ranking(art: Path, change, recount: bool = False) -> None:
    """Rewrite the ranking with `change` applied to its columns; `recount`: its params column then recomputed
    from the shapes, so that only the change itself is wrong."""
    from safetensors import safe_open
    from transformers import AutoConfig

    t = {k: v.clone() for k, v in load_file(str(art / RANKING)).items()}
    with safe_open(str(art / RANKING), framework="pt") as f:
        meta = f.metadata()
    change(t)
    if recount:
        shape = ModelShape.from_config(AutoConfig.from_pretrained(art))
        t["params"] = torch.from_numpy(RemovalCounter(shape, "q_head").costs(
            t["layer"].numpy().astype(np.int64), t["kind"].numpy().astype(np.int64),
            t["index"].numpy().astype(np.int64)).astype(np.int32))
    save_file(t, str(art / RANKING), metadata=meta)


def _header(art: Path, header) -> None:
    raw = json.dumps(header).encode()
    data = (art / WEIGHTS).read_bytes()
    n = int.from_bytes(data[:8], "little")
    (art / WEIGHTS).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _first_entry(art: Path) -> tuple[dict, str]:
    data = (art / WEIGHTS).read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    name = next(k for k in header if k != "__metadata__")
    return header, name


def _index(art: Path, target: str) -> None:
    names = list(load_file(str(next(art.glob("model*.safetensors")))))
    (art / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))


def _auto_map(art: Path, file: str, outside: Path) -> None:
    (art / "evil.py").write_text(f"open({str(outside / 'ran')!r}, 'w').write('code ran')\n")
    cfg = json.loads((art / file).read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Config", "AutoTokenizer": ["evil.Tok", None]}
    (art / file).write_text(json.dumps(cfg))


def _swap_into_protected(t) -> None:
    """A covered removal traded places with a structure of protected layer 0 (all in the uncovered tail)."""
    i, j = 0, int(torch.nonzero(t["layer"] == 0)[0])
    for k in ("layer", "kind", "index"):
        t[k][i], t[k][j] = t[k][j].clone(), t[k][i].clone()


CASES = {  # name -> (change the artifact's copy, reseal its manifest?, part of the one-line refusal)
    "index names ../": (lambda a, o: _index(a, "../outside/model.safetensors"), True, "points outside"),
    "index names an absolute path": (lambda a, o: _index(a, str(o / WEIGHTS)), True, "points outside"),
    "shard is a link out": (lambda a, o: (a / WEIGHTS).unlink() or os.symlink(o / WEIGHTS, a / WEIGHTS), True,
                            "outside"),
    "side file is a link out": (lambda a, o: os.symlink(o / "secret.txt", a / "NOTES.txt"), False, "outside"),
    "weights tampered": (lambda a, o: _flip(a / WEIGHTS), False, "sha256 differs"),
    "manifest names ../": (lambda a, o: _manifest(a, lambda m: m["files"].update({"../outside/secret.txt": "0"})),
                           False, "points outside"),
    "manifest is []": (lambda a, o: (a / MANIFEST).write_text("[]"), False, "not a gisp-deploy artifact"),
    "manifest without weights": (lambda a, o: _manifest(a, lambda m: m.pop("weights")), False, "lacks `weights`"),
    "ranking layer -1": (lambda a, o: _ranking(a, lambda t: t["layer"].__setitem__(0, -1)), True,
                         "outside the model's"),
    "ranking index out of range": (lambda a, o: _ranking(a, lambda t: t["index"].__setitem__(0, 999)), True,
                                   "outside the model's"),
    "ranking params inflated": (lambda a, o: _ranking(a, lambda t: t["params"].__setitem__(0, 10 ** 6)), True,
                                "params column"),
    "ranking prunes a protected layer": (lambda a, o: _ranking(a, _swap_into_protected, recount=True), True,
                                         "protected layers"),
    "header dims negative": (lambda a, o: _header(a, _negative(a)), True, "not a list of sizes >= 0"),
    "header dims huge": (lambda a, o: _header(a, _huge(a)), True, "does not match its shape"),
    "header is an array": (lambda a, o: _header(a, []), True, "unreadable safetensors header"),
    "config auto_map": (lambda a, o: _auto_map(a, "config.json", o), True, "`auto_map` asks to run code"),
    "tokenizer auto_map": (lambda a, o: _auto_map(a, "tokenizer_config.json", o), True,
                           "`auto_map` asks to run code"),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _manifest(art: Path, change) -> None:
    m = json.loads((art / MANIFEST).read_text())
    change(m)
    (art / MANIFEST).write_text(json.dumps(m))


def _negative(art):
    header, name = _first_entry(art)
    header[name]["shape"] = [-d for d in header[name]["shape"][:2]] if len(header[name]["shape"]) == 2 else [-1, -1]
    return header


def _huge(art):
    header, name = _first_entry(art)
    header[name]["shape"] = [1 << 40, 1 << 40]
    return header


@pytest.fixture
def outside(tmp_path):
    """Files outside the artifact that a crafted one names, with access times set back so a read would show."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_text("a secret\n")
    return out


def _trip(out: Path) -> dict:
    for f in out.iterdir():
        st = f.stat()
        os.utime(f, (st.st_mtime - 1000, st.st_mtime))
    return {f.name: f.stat().st_atime_ns for f in out.iterdir()}


def test_the_tripwire_sees_a_read(outside):
    before = _trip(outside)
    (outside / "secret.txt").read_text()
    assert (outside / "secret.txt").stat().st_atime_ns != before["secret.txt"]  # the filesystem records reads


def _one_error_line(res) -> str:
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_artifact_is_refused_everywhere(good, tmp_path, outside, case):
    change, sealed, message = CASES[case]
    shutil.copy(good / WEIGHTS, outside / WEIGHTS)
    art = tmp_path / "art"
    shutil.copytree(good, art)
    change(art, outside)
    if sealed:
        reseal(art)
    before = _trip(outside)
    with pytest.raises(ArtifactError, match=message):
        gisp_deploy.load(art, 0.4)
    with pytest.raises(ArtifactError, match=message):
        gisp_deploy.export(art, tmp_path / "export", 0.4)
    assert not (tmp_path / "export").exists()
    with pytest.raises(ArtifactError, match=message):
        check_slice(art, 0.4)  # what `serve` runs before vLLM is started
    with pytest.raises(ArtifactError, match=message):
        slice_summary(art, 0.4)
    checker = gisp_deploy.check(art, [0.4], json_report=tmp_path / "check.json")
    assert not checker.ok and message in next(r.message for r in checker.results if not r.ok)
    assert json.loads((tmp_path / "check.json").read_text())["ok"] is False
    res = subprocess.run([sys.executable, "-m", "gisp_deploy.cli", "eval", str(art), "--sparsities", "0.4", "--text",
                          str(EXAMPLE_HELDOUT), "--max-tokens", "256"], input="y\ny\n", capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert message in _one_error_line(res)
    assert not (outside / "ran").exists()  # no code of the artifact ran, whatever stdin said
    assert {f.name: f.stat().st_atime_ns for f in outside.iterdir() if f.name in before} == before  # nothing read
    assert sorted(f.name for f in outside.iterdir()) == sorted(before)  # nothing written there


def test_the_good_artifact_passes_every_path(good, tmp_path):
    assert gisp_deploy.load(good, 0.4) is not None
    gisp_deploy.export(good, tmp_path / "export", 0.4)
    umask = os.umask(0)
    os.umask(umask)
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "export").iterdir()} == {0o666 & ~umask}  # not 0600
    assert not [f for f in (tmp_path / "export").iterdir() if f.suffix == ".py" and f.name != "modeling_gisp.py"]
    assert gisp_deploy.check(good, [0.4]).ok
    digest = load_artifact(good).digest
    gisp_deploy.load(good, 0.4, expect_digest=digest)
    with pytest.raises(ArtifactError, match="not the expected"):
        gisp_deploy.load(good, 0.4, expect_digest="0" * 64)


def test_verification_reads_a_file_once_per_machine(good, tmp_path, monkeypatch):
    """A verified file, unchanged, is not hashed again; a changed one is, even with its times put back."""
    from gisp_deploy import integrity

    monkeypatch.setenv("GISP_DEPLOY_CACHE", str(tmp_path / "cache"))
    art = tmp_path / "art"
    shutil.copytree(good, art)
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    load_artifact(art)
    assert WEIGHTS in hashed
    hashed.clear()
    load_artifact(art)
    assert hashed == []  # every file known and unchanged
    st = (art / WEIGHTS).stat()
    _flip(art / WEIGHTS)
    os.utime(art / WEIGHTS, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored; the change time cannot be
    with pytest.raises(ArtifactError, match="sha256 differs"):
        load_artifact(art)
    load_artifact(art, verify=False)  # --no-verify: the user's call


def test_no_copy_weights_staging_links_only_plain_names(good, tmp_path, outside):
    from gisp_deploy.serving.process import staged_model_dir

    art = tmp_path / "ref"
    shutil.copytree(good, art)
    (art / WEIGHTS).unlink()
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(good / WEIGHTS, src / WEIGHTS)
    m = json.loads((art / MANIFEST).read_text())
    m["weights"] = {"copied": False, "source": str(src), "sha256": {"../outside/planted": "0" * 64}}
    m["files"].pop(WEIGHTS)
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="points outside"):
        staged_model_dir(art)
    assert not (tmp_path / "outside" / "planted").exists() and not list(tmp_path.glob("**/planted"))


def test_a_crafted_export_is_refused_before_vllm_reads_it(good, tmp_path, outside):
    export = tmp_path / "export"
    gisp_deploy.export(good, export, 0.4)
    assert slice_summary(export).layers == 4
    shutil.copy(next(export.glob("*.safetensors")), outside / WEIGHTS)
    _index(export, "../outside/model.safetensors")
    before = _trip(outside)
    with pytest.raises(ArtifactError, match="points outside"):
        check_slice(export)  # what `serve EXPORT` runs before vLLM is started
    with pytest.raises(ArtifactError, match="points outside"):
        slice_summary(export)
    assert {f.name: f.stat().st_atime_ns for f in outside.iterdir()} == before


def test_a_format_1_artifact_loads_and_says_what_was_not_verified(good, tmp_path, capfd):
    old = tmp_path / "old"
    shutil.copytree(good, old)
    _manifest(old, lambda m: (m.pop("files"), m.update(format_version=1)))
    assert gisp_deploy.load(old, 0.4) is not None and load_artifact(old).manifest["format_version"] == 1
    warned = [l for l in capfd.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warned) == 1 and "format-1" in warned[0] and "not verified" in warned[0]  # once, not per load
    _flip(old / WEIGHTS)
    with pytest.raises(ArtifactError, match="sha256 differs"):  # its weights are still covered
        load_artifact(old)
