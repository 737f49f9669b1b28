"""The host-to-device copy of a compact state dict: every tensor arrives bit for bit, however it is laid out."""

import pytest
import torch
from safetensors.torch import save_file

from gisp_deploy.safetensors_file import ShardFile
from gisp_deploy.slicing.upload import upload


def _tensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(40, 300, generator=gen).to(torch.bfloat16)
    save_file({"w": wide}, str(tmp_path / "w.safetensors"))
    shard = ShardFile(tmp_path / "w.safetensors")
    return shard, {
        "mapped rows": shard.mapped("w", list(range(5, 29)), 0),  # a view of the mapped file
        "mapped cols": shard.mapped("w", list(range(10, 210)), 1),  # strided
        "strided": torch.randn(64, 33, generator=gen)[:, 1:],
        "float32": torch.randn(1000, 7, generator=gen),
        "int64": torch.arange(77),
        "bool": torch.rand(13, 3, generator=gen) > 0.5,
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.empty(0, 16),
        "no columns": torch.empty(5, 0, dtype=torch.bfloat16),
        "3-d": torch.randn(4, 5, 6, generator=gen).to(torch.float16),
    }


@pytest.mark.parametrize("threads,chunk_bytes", [(1, 1 << 20), (3, 512), (8, 1)])
def test_upload_copies_every_tensor_bit_for_bit(tmp_path, threads, chunk_bytes):
    """chunk_bytes=512 splits most tensors into many blocks through both buffers of every thread; chunk_bytes=1
    is less than one row, so each buffer is grown to the widest row."""
    shard, tensors = _tensors(tmp_path)
    with shard:
        got = upload(tensors, torch.device("cpu"), threads=threads, chunk_bytes=chunk_bytes)
        assert got.keys() == tensors.keys()
        for key, want in tensors.items():
            assert got[key].shape == want.shape and got[key].dtype == want.dtype, key
            assert got[key].is_contiguous() and (got[key].data_ptr() != want.data_ptr() or not want.numel()), key
            assert torch.equal(got[key], want), key
    assert upload({}, torch.device("cpu")) == {}


@pytest.mark.gpu
def test_upload_to_cuda_bit_for_bit(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    shard, tensors = _tensors(tmp_path)
    with shard:
        got = upload(tensors, torch.device("cuda"), threads=3, chunk_bytes=512)
        torch.cuda.synchronize()
        for key, want in tensors.items():
            assert got[key].is_cuda and torch.equal(got[key].cpu(), want), key
