"""Load a slice of an artifact as a physically smaller transformers model.

Only the kept rows / columns of each dense tensor are materialised. On the CPU the safetensors files are
read with positioned reads: kept rows straight into the compact tensor (only their bytes are read), a tensor
with kept columns whole and then selected, so peak memory is the compact model plus one dense tensor and no
mapping of the checkpoint stays behind. On CUDA the dense tensors are read whole onto the device and gathered
there by the ragged Triton kernels, all tensors of each GATHER_BUDGET bytes (several layers) in one launch for
rows and one for columns. A slice that keeps everything is memory-mapped, as transformers does.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn as nn

from .artifact import ArtifactError, load_artifact
from .modeling import build_model, compact_config, materialize_buffers, plan_layouts
from .plan import SlicePlan, plan_slice

INDEX_FILE = "model.safetensors.index.json"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """[2, 3, 4, 9, 10] -> [(2, 5), (9, 11)]: maximal runs of consecutive indices as half-open ranges."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


GATHER_BUDGET = 2 << 30  # bytes of dense tensors held on the device per round of gathers (one launch per kind)


def _padded(t: torch.Tensor, src_pos: list[int], dim: int) -> torch.Tensor:
    """Spread the gathered slices of `t` over len(src_pos) positions along `dim`; -1 positions are zero."""
    if all(p >= 0 for p in src_pos):
        return t
    shape = list(t.shape)
    shape[dim] = len(src_pos)
    out = t.new_zeros(shape)
    dest = torch.tensor([i for i, p in enumerate(src_pos) if p >= 0], dtype=torch.long, device=t.device)
    out.index_copy_(dim, dest, t)
    return out


# ---- reading the dense checkpoint
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class ShardFile:
    """One safetensors file read with positioned reads into fresh tensors: only the requested bytes are read
    and nothing stays mapped. The header (8-byte length, JSON of dtype/shape/offsets) is the format's own."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        n = int.from_bytes(os.pread(self.fd, 8, 0), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            self.close()
            raise ArtifactError(f"{path}: not a safetensors file, or truncated (header of {n} bytes in a "
                                f"{size}-byte file); restore it from the source model")
        try:
            self.entries = json.loads(os.pread(self.fd, n, 8))
        except ValueError:
            self.close()
            raise ArtifactError(f"{path}: unreadable safetensors header; restore it from the source model") from None
        self.entries.pop("__metadata__", None)
        self.base = 8 + n
        for name, e in self.entries.items():
            a, b = e["data_offsets"]
            dtype = _DTYPES.get(e["dtype"])
            if dtype is None:
                self.close()
                raise ArtifactError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which gisp-deploy does not read")
            if b - a != math.prod(e["shape"]) * dtype.itemsize or self.base + b > size:
                self.close()
                raise ArtifactError(f"{path}: tensor {name!r} runs past the end of the file or does not match "
                                    "its shape; the file is truncated or damaged, restore it from the source model")

    def keys(self):
        return self.entries.keys()

    def read(self, name: str, rows: list[int] | None = None) -> torch.Tensor:
        """The tensor, or only its `rows` (dim 0, in the given order)."""
        e = self.entries[name]
        shape, (a, b) = e["shape"], e["data_offsets"]
        out = torch.empty(shape if rows is None else [len(rows), *shape[1:]], dtype=_DTYPES[e["dtype"]])
        if rows is None:
            self._fill(out, self.base + a)
            return out
        row_bytes = (b - a) // shape[0] if shape[0] else 0
        pos = 0
        for r0, r1 in _runs(rows):
            if not 0 <= r0 < r1 <= shape[0]:
                raise IndexError(f"rows {r0}..{r1 - 1} of {name} (of {shape[0]})")
            self._fill(out[pos:pos + r1 - r0], self.base + a + r0 * row_bytes)
            pos += r1 - r0
        return out

    def _fill(self, t: torch.Tensor, offset: int) -> None:
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # t is contiguous: writes land in it
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise ArtifactError(f"{self.path}: the file ended early; it is truncated, restore it")
            done += n

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class WeightReader:
    """Tensor name -> its safetensors file, over the artifact's weight files (sharded or not). `device="cpu"`
    reads with ShardFile (positioned reads); another device through safetensors onto that device."""

    def __init__(self, weights_dir: Path, device: str):
        self.dir = Path(weights_dir)
        self.device = device
        self._stack = ExitStack()
        self._handles: dict[tuple[str, str], object] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            self.where = dict(json.loads(index.read_text())["weight_map"])
        else:  # one file, or shards without an index: their headers say what they hold
            self.where = {name: f.name for f in sorted(self.dir.glob("*.safetensors"))
                          for name in self._handle(f.name, "direct").keys()}
        if not self.where:
            raise ArtifactError(f"{self.dir}: no safetensors weights found")

    def _handle(self, fname: str, kind: str):
        """The open file: "direct" a ShardFile, "mapped" a safetensors handle on this reader's device."""
        if (kind, fname) not in self._handles:
            path = self.dir / fname
            if not path.is_file():
                raise ArtifactError(f"{path}: weight file missing; the artifact is incomplete")
            if kind == "direct":
                handle = ShardFile(path)
            else:
                from safetensors import safe_open

                handle = safe_open(str(path), framework="pt", device=self.device)
            self._handles[(kind, fname)] = self._stack.enter_context(handle)
        return self._handles[(kind, fname)]

    def _file(self, name: str) -> str:
        if name not in self.where:
            raise ArtifactError(f"{self.dir}: tensor {name!r} not found in the weights")
        return self.where[name]

    def read(self, name: str, rows: list[int] | None = None) -> torch.Tensor:
        """A fresh CPU tensor of `name`, or of its `rows` only (positioned reads; nothing stays mapped)."""
        return self._handle(self._file(name), "direct").read(name, rows)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def source(self, name: str):
        """The tensor: memory-mapped (zero-copy, pages read on touch) on the CPU, whole on a GPU."""
        return self._handle(self._file(name), "mapped").get_tensor(name)

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _selection(key: str, layouts, head_dim: int):
    """(rows, cols) of the source tensor for compact tensor `key`: lists of source indices with -1 for
    zero padding, or None for 'all'."""
    m = _LAYER_KEY.match(key)
    if not m:
        return None, None
    lay = layouts[int(m.group(1))]
    proj, kind = m.group(3), m.group(4)

    def expand(heads):
        return [h * head_dim + d if h >= 0 else -1 for h in heads for d in range(head_dim)]

    if proj == "q_proj":
        return expand(lay.q_src), None
    if proj in ("k_proj", "v_proj"):
        return expand(lay.kv_src), None
    if proj in ("gate_proj", "up_proj"):
        return list(lay.channels), None
    if kind == "bias":  # o_proj / down_proj bias: outputs are never sliced
        return None, None
    if proj == "o_proj":
        return None, expand(lay.q_src)
    if proj == "down_proj":
        return None, list(lay.channels)
    return None, None  # q_norm / k_norm (Qwen3): shared over heads


def read_state_dict(reader: WeightReader, model: nn.Module, layouts, head_dim: int, device, dtype,
                    copy_mapped: bool = True, on_device: bool = False, budget: int | None = None) -> dict:
    """The compact model's state dict, gathered from the dense checkpoint; tied weights left out.

    CPU (default): positioned reads of the kept rows; tensors sliced by columns read whole, then selected.
    on_device: dense tensors read whole onto the reader's device, and every `budget` bytes of them gathered
    in one launch for rows and one for columns (ragged over layers, gisp_deploy/kernels/gather.py; torch
    indexing without triton). With copy_mapped=False (a slice that keeps everything) tensors are taken whole,
    memory-mapped on the CPU as transformers loads a dense model."""
    budget = GATHER_BUDGET if budget is None else budget
    tied = set(_tied_keys(model))
    metas = {k: v for k, v in model.state_dict().items() if k not in tied}  # tied: set by tie_weights after loading
    sd: dict[str, torch.Tensor] = {}

    def finish(key: str, t: torch.Tensor) -> None:
        meta = metas[key]
        if tuple(t.shape) != tuple(meta.shape):
            raise ArtifactError(f"{key}: the checkpoint gives shape {tuple(t.shape)}, the slice needs "
                                f"{tuple(meta.shape)}; the weights do not match the artifact's config")
        sd[key] = t.to(device=device, dtype=dtype if meta.is_floating_point() else meta.dtype)

    pending: list = []  # (key, dense tensor on the device, rows, cols) waiting for the next round of gathers
    held = 0
    for key in metas:
        rows, cols = _selection(key, layouts, head_dim)
        if not copy_mapped:
            finish(key, reader.source(key))
        elif on_device:
            src = reader.source(key)
            pending.append((key, src, rows, cols))
            held += src.numel() * src.element_size()
            if held >= budget:
                _gather_round(pending, finish)
                held = 0
        elif rows is not None:
            finish(key, _padded(reader.read(key, [r for r in rows if r >= 0]), rows, 0))
        elif cols is not None:
            kept = torch.tensor([c for c in cols if c >= 0], dtype=torch.long)
            finish(key, _padded(reader.read(key).index_select(1, kept), cols, 1))
        else:
            finish(key, reader.read(key))
    _gather_round(pending, finish)
    return sd


def _gather_round(pending: list, finish) -> None:
    """Gather the kept rows / columns of every pending tensor: one ragged launch per kind (and shared width)."""
    from .kernels import gather

    jobs = {0: [], 1: []}
    for key, src, rows, cols in pending:
        dim, pos = (0, rows) if rows is not None else (1, cols)
        kept = [] if pos is None else [p for p in pos if p >= 0]
        if pos is None or (len(pos) == len(kept) and kept == list(range(src.shape[dim]))):
            finish(key, src)  # kept whole
        elif src.dim() == 1:  # a bias: a few bytes, torch indexing
            finish(key, _padded(src.index_select(0, torch.tensor(kept, dtype=torch.long, device=src.device)), pos, 0))
        else:
            jobs[dim].append((key, src, kept, pos))
    index: dict = {}  # one tensor per distinct kept list (gate/up, and q/k/v without GQA): the gather copies it once

    def as_tensor(kept: list) -> torch.Tensor:
        key = tuple(kept)
        if key not in index:
            index[key] = torch.tensor(kept, dtype=torch.long)
        return index[key]

    for dim, fn in ((0, gather.gather_rows), (1, gather.gather_cols)):
        if jobs[dim]:
            got = fn([src for _, src, _, _ in jobs[dim]], [as_tensor(k) for _, _, k, _ in jobs[dim]])
            for (key, _, _, pos), t in zip(jobs[dim], got):
                finish(key, _padded(t, pos, dim))
    pending.clear()


def _tied_keys(model: nn.Module) -> list[str]:
    if not getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", False):
        return []
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return list(tied) if isinstance(tied, (dict, list, tuple, set)) else []


def load(artifact, sparsity: float | None = None, *, device="cpu", dtype: torch.dtype = torch.float32,
         tp_size: int = 1, channel_multiple: int = 1, plan: SlicePlan | None = None,
         attn_implementation: str | None = None, gather: str = "auto") -> nn.Module:
    """The slice of `artifact` (an Artifact or its path) at `sparsity` (or `plan`) as a compact model;
    `tp_size` / `channel_multiple` round each layer's widths for deployment (see plan.plan_slice).
    gather="device" reads dense tensors whole and gathers them with the ragged kernels, as on CUDA, also on the
    CPU (there through Triton's interpreter when TRITON_INTERPRET=1: slow, for tests)."""
    if not hasattr(artifact, "ranking"):
        artifact = load_artifact(artifact)
    if plan is None:
        if sparsity is None:
            raise ValueError("pass a sparsity or a plan")
        plan = plan_slice(artifact.ranking, sparsity, tp_size=tp_size, channel_multiple=channel_multiple)
    elif plan.shape != artifact.shape:
        raise ValueError("the plan was made for a model of another shape than the artifact's")
    if gather not in ("auto", "device"):
        raise ValueError(f"gather={gather!r}: choose auto or device")
    device = torch.device(device)
    layouts = plan_layouts(plan)
    config = compact_config(artifact.config, plan, dtype)
    model = build_model(config, attn_implementation)
    read_dev = "cpu" if device.type == "cpu" else str(device)
    with WeightReader(artifact.weights_dir, read_dev) as reader:
        sd = read_state_dict(reader, model, layouts, plan.shape.head_dim, device, dtype,
                             copy_mapped=plan.kept_params < plan.shape.total_params,
                             on_device=device.type != "cpu" or gather == "device")
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    del sd
    tied = _tied_keys(model)
    if unexpected or set(missing) - set(tied):
        raise ArtifactError(f"weights do not fit the slice: missing {sorted(set(missing) - set(tied))}, "
                            f"unexpected {sorted(unexpected)}")
    if missing:
        model.tie_weights()
    materialize_buffers(model, device)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ArtifactError(f"parameters left unloaded: {left}")
    model.eval()
    _load_generation_config(model, artifact.path)
    return model


def _load_generation_config(model, path: Path) -> None:
    if (Path(path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
