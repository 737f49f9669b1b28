"""Positioned reads of safetensors files, and headers refused before anything is allocated from them."""

import json

import pytest
import torch
from safetensors.torch import save_file

from gisp_deploy.artifact import ArtifactError
from gisp_deploy.safetensors_file import ShardFile, check_header


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shard_file_reads_rows_exactly(tmp_path, dtype):
    w = torch.randn(40, 100).to(dtype)
    b = torch.randn(40).to(dtype)
    save_file({"w": w, "b": b, "i": torch.arange(7)}, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    g = torch.Generator().manual_seed(0)
    cases = [[], [5], list(range(10, 20)), sorted(torch.randperm(40, generator=g)[:17].tolist()), [9, 3, 4, 5, 0],
             list(range(40))]
    with ShardFile(tmp_path / "t.safetensors") as f:
        assert set(f.keys()) == {"w", "b", "i"}
        assert torch.equal(f.read("w"), w) and torch.equal(f.read("i"), torch.arange(7))
        for idx in cases:
            t = torch.tensor(idx, dtype=torch.long)
            assert torch.equal(f.read("w", idx), w[t]) and torch.equal(f.read("b", idx), b[t])
        with pytest.raises(IndexError):
            f.read("w", [39, 40])


def test_shard_file_refuses_truncated_and_foreign_files(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    for name, message in (("cut", "truncated"), ("junk", "not a safetensors file"), ("pickle", "not a safetensors")):
        with pytest.raises(ArtifactError, match=message):
            ShardFile(tmp_path / f"{name}.safetensors")


def _with_header(path, header) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\x00" * 64)


@pytest.mark.parametrize("header, message", [
    ([], "unreadable safetensors header"),
    ({"w": {"dtype": "F32", "shape": [-4, -4], "data_offsets": [0, 64]}}, "not a list of sizes >= 0"),
    ({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 64]}}, "does not match its shape"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 50]}}, "outside the file's 64 data bytes"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "data offsets"),
    ({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, "not a list of sizes"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, "dtype Q4"),
    ({"w": [1, 2]}, "has no dtype"),
])
def test_crafted_headers_are_refused_before_any_allocation(tmp_path, header, message):
    _with_header(tmp_path / "x.safetensors", header)
    for opener in (ShardFile, check_header):
        with pytest.raises(ArtifactError, match=message):
            opener(tmp_path / "x.safetensors")
