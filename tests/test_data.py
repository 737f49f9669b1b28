import gzip

import pytest

from gisp_deploy.data import DataError, expand_paths, load_calibration, read_text
from tests.factory import CALIB_TEXT, EXAMPLE_MODEL


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EXAMPLE_MODEL)


def test_windows_are_seeded_and_fingerprinted(tok):
    a = load_calibration("lm", tok, [CALIB_TEXT], samples=5, seq_len=32, seed=3)
    b = load_calibration("lm", tok, [CALIB_TEXT], samples=5, seq_len=32, seed=3)
    c = load_calibration("lm", tok, [CALIB_TEXT], samples=5, seq_len=32, seed=4)
    assert a.input_ids.shape == (5, 32)
    assert a.fingerprint == b.fingerprint and a.fingerprint["sha256"] != c.fingerprint["sha256"]
    assert a.fingerprint["samples"] == 5 and a.fingerprint["seq_len"] == 32


def test_folders_and_plain_and_gzip_text(tok, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("hello world. " * 50)
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("another text. " * 50)
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    assert [p.name for p in expand_paths([tmp_path])] == ["b.txt.gz", "a.txt"]
    calib = load_calibration("lm", tok, [tmp_path], samples=2, seq_len=16, seed=0)
    assert calib.input_ids.shape == (2, 16)


def test_empty_and_short_calibration_are_refused(tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="shorter than one sample"):
        load_calibration("lm", tok, [empty], samples=4, seq_len=64, seed=0)
    with pytest.raises(DataError, match="no calibration data"):
        load_calibration("lm", tok, [], samples=4, seq_len=64, seed=0)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        load_calibration("lm", tok, [tmp_path / "nothing"], samples=4, seq_len=64, seed=0)


def test_non_utf8_and_missing_paths(tok, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin1"))
    with pytest.raises(DataError, match="not UTF-8.*iconv"):
        read_text(bad)
    with pytest.raises(DataError, match="missing-dataset: no such file or folder"):
        load_calibration("lm", tok, [str(tmp_path / "missing-dataset")], samples=4, seq_len=64, seed=0)


def test_a_missing_local_path_never_goes_to_the_hub(monkeypatch, tmp_path):
    """A typo is an error at once; only hf://NAME asks the hub (here a stub that records the request)."""
    from gisp_deploy import data

    asked = []
    monkeypatch.setattr(data, "_hub_dataset", lambda name: asked.append(name) or [CALIB_TEXT])
    for typo in ("nothere.txt", "data/calib.txt", "c4", "allenai/c4", str(tmp_path / "gone" / "x.txt")):
        with pytest.raises(DataError, match=r"no such file or folder \(a Hugging Face dataset is read only when"):
            expand_paths([typo])
    assert asked == []
    assert expand_paths(["hf://allenai/c4"]) == [CALIB_TEXT] and asked == ["allenai/c4"]
