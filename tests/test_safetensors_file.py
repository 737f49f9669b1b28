"""Positioned reads of safetensors files, and headers refused before anything is allocated from them."""

import json

import pytest
import torch
from safetensors.torch import save_file

from gisp_deploy.artifact import ArtifactError
from gisp_deploy import safetensors_file
from gisp_deploy.safetensors_file import ShardFile, StagingBuffer
from gisp_deploy.safetensors_header import check_header


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


def test_mapped_views_are_the_runs_and_nothing_else(tmp_path):
    """A whole tensor, one run of rows or of columns: views equal to the tensor's, copy-on-write (a write never
    reaches the file); padding, gaps, reordering, out-of-range positions or another dtype: None (a copy is needed)."""
    w = torch.randn(40, 100)
    path = tmp_path / "t.safetensors"
    save_file({"w": w}, str(path), metadata={"format": "pt"})
    with ShardFile(path) as f:
        assert torch.equal(f.mapped("w"), w)
        for dim in (0, 1):
            for lo, hi in ((0, 40), (3, 17), (39, 40)):
                view = f.mapped("w", list(range(lo, hi)), dim)
                assert torch.equal(view, w.narrow(dim, lo, hi - lo))
        for positions in ([], [3, 5], [4, 3], [3, 4, -1], [-1, 0], [38, 39, 40], [3, 4, 4, 5]):
            assert f.mapped("w", positions, 0) is None, positions
        assert f.mapped("w", None, 0, torch.bfloat16) is None
        f.mapped("w", list(range(2, 4)), 0).fill_(7)
    with ShardFile(path) as f:
        assert torch.equal(f.read("w"), w)


def _expected(t: torch.Tensor, positions, dim: int, dtype) -> torch.Tensor:
    """The oracle: torch indexing, -1 positions zero."""
    idx = torch.tensor([max(p, 0) for p in positions], dtype=torch.long)
    want = t.index_select(dim, idx).to(dtype)
    holes = torch.tensor([i for i, p in enumerate(positions) if p < 0], dtype=torch.long)
    return want.index_fill_(dim, holes, 0) if len(holes) else want


@pytest.mark.parametrize("call_bytes", [0, 1 << 40])  # every row run read straight in / every row staged
@pytest.mark.parametrize("staging_bytes", [1 << 20, 3 * 100 * 4, 1])  # roomy; a few rows per block; under one row
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mappable", [True, False])  # gathered from the mapped file / read into the staging buffer
def test_read_into_gathers_rows_and_columns_exactly(tmp_path, dtype, staging_bytes, call_bytes, mappable,
                                                    monkeypatch):
    """Every way of reading kept rows / columns into a given tensor against torch indexing: empty, single
    rows, all kept, runs read straight in and staged, unsorted, padding (-1), columns in and out of order,
    a tensor larger than the staging buffer, and a conversion to another dtype; from the mapped file and,
    as for an entry whose offset cannot be mapped, through positioned reads only."""
    monkeypatch.setattr(safetensors_file, "READ_CALL_BYTES", call_bytes)
    if not mappable:
        monkeypatch.setattr(ShardFile, "_whole", lambda self, e: None)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 100, generator=g).to(dtype)
    big = torch.randn(300, 64, generator=g).to(dtype)  # runs of 100 rows: long enough to be read straight in
    save_file({"w": w, "big": big, "b": w[:, 0].contiguous()}, str(tmp_path / "t.safetensors"))
    scattered = sorted(torch.randperm(40, generator=g)[:17].tolist())
    rows = {"w": [[], [5], [39], list(range(40)), scattered, [9, 3, 4, 5, 0], [3, -1, 4, -1, -1, 7], [-1, -1]],
            "big": [list(range(300)), [*range(0, 100), -1, *range(150, 250)], list(range(299, -1, -1))],
            "b": [[0], scattered, [-1, 2, 3], [0, 0, 2], [4, 4]]}  # repeats too
    cols = {"w": [[], [7], list(range(100)), [1, 2, 3, 50, 51, 99], [99, 0, 50], [4, -1, 5, -1],
                  [*range(0, 40), -1, -1, *range(60, 90), -1], [*range(50, 100), *range(0, 30)]],  # long runs
            "big": [list(range(1, 64, 2))]}
    with ShardFile(tmp_path / "t.safetensors") as f:
        for out_dtype in (dtype, torch.float32):
            for dim, cases in ((0, rows), (1, cols)):
                for name, position_lists in cases.items():
                    src = {"w": w, "big": big, "b": w[:, 0]}[name]
                    for pos in position_lists:
                        shape = list(src.shape)
                        shape[dim] = len(pos)
                        out = torch.full(shape, 7.0, dtype=out_dtype)  # stale contents must not survive
                        f.read_into(name, out, pos, dim, StagingBuffer(staging_bytes))
                        want = _expected(src, pos, dim, out_dtype)
                        assert torch.equal(out, want), (name, dim, pos, out_dtype)
            whole = torch.empty(40, 100, dtype=out_dtype)
            f.read_into("w", whole, staging=StagingBuffer(staging_bytes))
            assert torch.equal(whole, w.to(out_dtype))


def test_read_into_refuses_wrong_destinations_and_positions(tmp_path):
    save_file({"w": torch.randn(8, 6)}, str(tmp_path / "t.safetensors"))
    with ShardFile(tmp_path / "t.safetensors") as f:
        with pytest.raises(ValueError, match="destination of shape"):
            f.read_into("w", torch.empty(3, 6), [1, 2])
        with pytest.raises(ValueError, match="destination of shape"):
            f.read_into("w", torch.empty(6, 8).t(), None)  # not contiguous
        with pytest.raises(IndexError, match="of w"):
            f.read_into("w", torch.empty(2, 6), [1, 8])
        with pytest.raises(IndexError, match="of w"):
            f.read_into("w", torch.empty(8, 2), [-2, 0], dim=1)
        with pytest.raises(ValueError, match="cannot select along dim 2"):
            f.read_into("w", torch.empty(8, 6), [0], dim=2)


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


def test_fresh_zeros_leaves_unwritten_pages_unallocated(tmp_path, monkeypatch):
    """Padding left alone in fresh pages: read_into(..., zeroed=True) gives what it does into stale memory, and
    a large fresh tensor costs no memory until written (Linux's RssAnon)."""
    monkeypatch.setattr(safetensors_file, "FRESH_PAGES_BYTES", 0)  # every tensor of this test in pages of its own
    w = torch.randn(40, 100)
    save_file({"w": w}, str(tmp_path / "t.safetensors"))
    with ShardFile(tmp_path / "t.safetensors") as f:
        for pos, dim in (([3, -1, 4, -1, -1, 7], 0), ([4, -1, 5, -1, *range(60, 90)], 1)):
            shape = [40, 100]
            shape[dim] = len(pos)
            out = safetensors_file.fresh_zeros(shape, torch.float32)
            f.read_into("w", out, pos, dim, zeroed=True)
            assert torch.equal(out, _expected(w, pos, dim, torch.float32))

    def anon_mb():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon:")) / 1024

    before = anon_mb()
    big = safetensors_file.fresh_zeros((64, 1 << 20), torch.float32)  # 256 MiB
    assert big.dtype == torch.float32 and big.shape == (64, 1 << 20)
    assert not big[::7, ::4096].any() and anon_mb() - before < 16  # read: the kernel's zero page, nothing allocated
    big[3].fill_(1.0)
    assert 4 - 1 < anon_mb() - before < 16 and float(big.sum()) == 1 << 20
