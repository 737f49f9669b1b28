"""The header reader is torch-free, and its element sizes are torch's."""

import subprocess
import sys

from gisp_deploy.arguments import DTYPE_ITEMSIZE, DTYPE_NAMES, dtype_bytes
from gisp_deploy.hf import DTYPES
from gisp_deploy.safetensors_file import SAFETENSORS_DTYPES
from gisp_deploy.safetensors_header import ITEMSIZE


def test_element_sizes_are_torchs():
    assert ITEMSIZE == {code: dtype.itemsize for code, dtype in SAFETENSORS_DTYPES.items()}
    assert DTYPE_ITEMSIZE == {name: DTYPES[name].itemsize for name in set(DTYPE_NAMES.values())}
    assert all(dtype_bytes(name) == DTYPES[name].itemsize for name in DTYPE_NAMES)


def test_checking_headers_imports_no_torch(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"w": np.zeros((3, 4), dtype=np.float32)}, str(tmp_path / "w.safetensors"))
    probe = ("import sys\nfrom gisp_deploy.safetensors_header import check_header\n"
             f"check_header({str(tmp_path / 'w.safetensors')!r})\nprint('torch' in sys.modules)\n")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout == "False\n"
