"""Load a slice of an artifact as a physically smaller transformers model.

Only the kept rows / columns of each dense tensor are materialised. On the CPU the safetensors files are
mapped copy-on-write where a compact tensor is one contiguous run of a dense one's rows or columns in the
file's dtype (whole tensors; the prefixes of a rank-ordered artifact; padded query groups whose padding heads
can be the file's next ones, layout.padding_from_file), and read with positioned reads into fresh compact
tensors otherwise (safetensors_file.ShardFile.read_into): long runs of kept rows straight in, long runs
of kept columns (o_proj's padded groups) copied from the mapped file, scattered rows and columns gathered from
the mapped file (through staging buffers, STAGING_BYTES in all, where an entry cannot be mapped), by READ_THREADS
threads (CopyPool) while the model is built and put together: the sliced tensors are begun from the checkpoint's
own index before the model exists (start_sliced_reads). So peak anonymous memory is the compact model plus at
most those buffers. On a GPU a rank-ordered slice's
host-cut tensors are copied over by upload.py (only the compact bytes cross the bus); a source-order slice (or
gather="device") has its dense tensors read whole onto the device and gathered there by the ragged Triton kernels, all tensors of each
GATHER_BUDGET bytes (several layers) in one launch for rows and one for columns. A slice that keeps everything is
memory-mapped, as transformers does.
"""

from __future__ import annotations

import copy
import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn

from ..arguments import REFITS
from ..artifact import ArtifactError, load_artifact
from ..budget import budget_plan
from ..hf import pick_device
from ..layout import kept, padding_from_file, select, source_indices, spread
from ..modeling import build_model, compact_config, materialize_buffers, plan_layouts
from ..plan import SlicePlan, plan_slice
from ..rank_order import LAYOUT_KEY, RANK_ORDERED
from ..refit import DEFAULT_RIDGE
from ..safetensors_file import STAGING_BYTES, StagingBuffer, fresh_zeros
from .correction import correct, refit_record, statistics_or_notice
from .upload import HOST_THREADS, balanced, upload
from .weights import WeightReader

CORRECTION_BIASES = ("o_proj.bias", "down_proj.bias")  # a corrected slice has them whatever its family's rules
READ_THREADS = HOST_THREADS  # threads reading the tensors that are copied: on 2 CPUs, 2 made a 1.5B slice ready
#   1.2-2.4x as fast as 1 (faulting in fresh pages is most of a copy; pre-faulting them with MAP_POPULATE was slower)
GATHER_BUDGET = 2 << 30  # bytes of dense tensors held on the device per round of gathers (one launch per kind)
_NOTICED: set = set()  # artifacts told they are in source order, in this process


class CopyPool:
    """READ_THREADS threads filling compact tensors from the checkpoint (reads and numpy copies release the GIL),
    each read holding one of READ_THREADS staging buffers of STAGING_BYTES / READ_THREADS (allocated only for an
    entry that cannot be mapped), so the staging bytes are split over the threads, never multiplied."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(READ_THREADS)
        self._futures: list = []
        self._staging: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(READ_THREADS):
            self._staging.put(StagingBuffer(STAGING_BYTES // READ_THREADS))

    def read(self, reader: WeightReader, jobs: list) -> None:
        """Begin filling each fresh-zero `out` of `jobs`, (key, out, positions, dim), with `key`'s entries at
        `positions` along `dim` (padding left zero): largest first, split by bytes into one task per thread (with
        one task a tensor, submitting them took a float32 0.2 slice of a 1.5B 300-400 ms instead of 30-45)."""
        parts = balanced(jobs, lambda job: job[1].nbytes, READ_THREADS)
        self._futures.extend(self._pool.submit(self._read, reader, part) for part in parts if part)

    def _read(self, reader, part: list) -> None:
        staging = self._staging.get()  # never waits: no more tasks run at once than there are buffers
        try:
            for key, out, positions, dim in part:
                reader.read_into(key, out, positions, dim, staging, zeroed=True)
        finally:
            self._staging.put(staging)

    def wait(self) -> None:
        """Until every read begun is done; the first read error, if any."""
        for f in self._futures:
            f.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)  # on an error, no more reads begin


def read_state_dict(reader: WeightReader, model: nn.Module, layouts, head_dim: int, device, dtype,
                    copy_mapped: bool = True, on_device: bool = False, budget: int | None = None, *,
                    copies: CopyPool | None = None, started: dict | None = None) -> dict:
    """The compact model's state dict, gathered from the dense checkpoint; tied weights left out.

    CPU (default): one-run tensors mapped from the file, the others read into the compact tensors (kept rows /
    columns; _read_positioned) by `copies`. It returns while the copies still run: the tensors in the dict are
    the ones being filled, to be used only after copies.wait() (while `reader` is open). `started`: the sliced tensors
    start_sliced_reads began before the model was built, checked here against the model's shapes.
    on_device: a tensor kept whole or as one run of rows (a rank-ordered artifact's row prefixes) is copied to
    the device from the mapped file, only its kept bytes; the other dense tensors are read whole onto the
    reader's device, and every `budget` bytes of them gathered in one launch for rows and one for columns
    (ragged over layers, gisp_deploy/kernels/gather.py; torch indexing without triton). With copy_mapped=False (a slice that keeps everything) tensors are taken whole,
    memory-mapped on the CPU as transformers loads a dense model."""
    budget = GATHER_BUDGET if budget is None else budget
    tied = set(_tied_keys(model))
    metas = {k: v for k, v in model.state_dict().items() if k not in tied}  # tied: set by tie_weights after loading
    sd: dict[str, torch.Tensor] = {}

    for key in [k for k in metas if k.endswith(CORRECTION_BIASES) and k not in reader]:
        sd[key] = torch.zeros(metas.pop(key).shape, device=device, dtype=dtype)  # a corrected slice's own bias

    def finish(key: str, t: torch.Tensor) -> None:
        meta = metas[key]
        if tuple(t.shape) != tuple(meta.shape):
            raise ArtifactError(f"{key}: the checkpoint gives shape {tuple(t.shape)}, the slice needs "
                                f"{tuple(meta.shape)}; the weights do not match the artifact's config")
        sd[key] = t.to(device=device, dtype=dtype if meta.is_floating_point() else meta.dtype)

    if copy_mapped and not on_device:
        for key in [k for k in metas if k in (started or {})]:
            finish(key, started[key])  # shape checked; mapped views and tensors being filled stay as they are
            del metas[key]
        wants = []
        for key, meta in metas.items():
            rows, cols = source_indices(key, layouts, head_dim)
            dim, pos = (1, cols) if cols is not None else (0, rows)
            wants.append((key, tuple(meta.shape), dtype if meta.is_floating_point() else meta.dtype, pos, dim))
        _read_positioned(reader, wants, sd, copies)
        return sd
    pending: list = []  # (key, dense tensor on the device, rows, cols) waiting for the next round of gathers
    held = 0
    for key in metas:
        if not copy_mapped:
            finish(key, reader.source(key))
            continue
        rows, cols = source_indices(key, layouts, head_dim)
        if cols is None:  # the whole tensor, or one run of rows: only those bytes, from the mapped file
            view = _mapped_rows(reader, key, rows, None)
            if view is not None:
                finish(key, view)
                continue
        src = reader.source(key)
        pending.append((key, src, rows, cols))
        held += src.numel() * src.element_size()
        if held >= budget:
            _gather_round(pending, finish)
            held = 0
    _gather_round(pending, finish)
    return sd


def start_sliced_reads(reader: WeightReader, layouts, head_dim: int, dtype, copies: CopyPool) -> dict:
    """CPU, before the model is built: every tensor of the checkpoint that a layer slices, mapped or its copy
    begun by `copies`, by key. Building the model's layers then runs beside the copies of padded query groups (a
    0.4 slice of a rank-ordered 1.5B copies 260 MB of them, about as long as the build). Shapes are checked
    against the model afterwards (read_state_dict `started`); a tensor the model has no place for is dropped."""
    wants = []
    for key in reader.where:
        rows, cols = source_indices(key, layouts, head_dim)
        dim, pos = (1, cols) if cols is not None else (0, rows)
        if not pos:
            continue  # kept whole: mapped (or read) once the model asks for it; nothing kept: no such tensor
        shape = reader.shape(key)
        if len(shape) <= dim:
            raise ArtifactError(f"{key}: the checkpoint gives shape {tuple(shape)}, not a tensor the slice can "
                                f"select along dim {dim} of; the weights do not match the artifact's config")
        if max(pos) >= shape[dim]:
            raise ArtifactError(f"{key}: the slice keeps entry {max(pos)} along dim {dim}, the checkpoint has "
                                f"{shape[dim]}; the weights do not match the artifact's ranking")
        shape[dim] = len(pos)
        wants.append((key, tuple(shape), dtype, pos, dim))
    got: dict = {}
    _read_positioned(reader, wants, got, copies)
    return got


def _read_positioned(reader: WeightReader, wants: list, sd: dict, copies: CopyPool) -> None:
    """CPU: each of `wants`, (key, compact shape, dtype, positions or None, dim), into `sd`. A compact tensor
    that is one contiguous run of its dense tensor's rows or columns, in the file's dtype, is a copy-on-write
    view of the mapped file (read when first touched, like a dense model; every tensor of a rank-ordered
    artifact's MLP, and its q_proj where padding heads can be the file's next ones); every other one is read into
    fresh zero pages of its own (kept rows / columns only, see ShardFile.read_into; padding never written) by
    `copies`, begun once every tensor of `wants` is placed. So peak anonymous memory is at most the compact model plus
    STAGING_BYTES."""
    jobs = []
    for key, shape, dt, pos, dim in wants:
        got = reader.shape(key)  # opens the tensor's file here, not in a thread
        if pos is not None and len(got) > dim:
            got[dim] = len(pos)
        if tuple(got) != shape:
            raise ArtifactError(f"{key}: the checkpoint gives shape {tuple(got)}, the slice needs "
                                f"{shape}; the weights do not match the artifact's config")
        view = reader.mapped(key, pos, dim, dt) if dim else _mapped_rows(reader, key, pos, dt)
        if view is None:
            view = fresh_zeros(shape, dt)  # padding stays untouched
            jobs.append((key, view, pos, dim))
        sd[key] = view
    copies.read(reader, jobs)


def _mapped_rows(reader: WeightReader, key: str, rows: list[int] | None, dtype):
    """Kept `rows` of `key` as a view of the mapped file, their padding rows read from the file where it cannot
    matter (layout.padding_from_file); None where they are not one run."""
    view = reader.mapped(key, rows, 0, dtype)
    filled = padding_from_file(key, rows) if view is None else None
    return view if filled is None else reader.mapped(key, filled, 0, dtype)


def _gather_round(pending: list, finish) -> None:
    """Gather the kept rows / columns of every pending tensor: one ragged launch per kind (and shared width)."""
    from ..kernels import gather

    jobs = {0: [], 1: []}
    for key, src, rows, cols in pending:
        dim, pos = (0, rows) if rows is not None else (1, cols)
        real = [] if pos is None else kept(pos)
        if pos is None or (len(pos) == len(real) and real == list(range(src.shape[dim]))):
            finish(key, src)  # kept whole
        elif src.dim() == 1:  # a bias: a few bytes, torch indexing
            finish(key, select(src, pos, 0))
        else:
            jobs[dim].append((key, src, real, pos))
    index: dict = {}  # one tensor per distinct kept list (gate/up, and q/k/v without GQA): the gather copies it once

    def as_tensor(real: list) -> torch.Tensor:
        key = tuple(real)
        if key not in index:
            index[key] = torch.tensor(real, dtype=torch.long)
        return index[key]

    for dim, fn in ((0, gather.gather_rows), (1, gather.gather_cols)):
        if jobs[dim]:
            got = fn([src for _, src, _, _ in jobs[dim]], [as_tensor(k) for _, _, k, _ in jobs[dim]])
            for (key, _, _, pos), t in zip(jobs[dim], got):
                finish(key, spread(t, pos, dim))
    pending.clear()


def _tied_keys(model: nn.Module) -> list[str]:
    if not getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", False):
        return []
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return list(tied) if isinstance(tied, (dict, list, tuple, set)) else []


def load(artifact, sparsity: float | None = None, *, device="cpu", dtype: torch.dtype = torch.float32,
         tp_size: int = 1, channel_multiple: int = 1, plan: SlicePlan | None = None,
         attn_implementation: str | None = None, gather: str = "auto", verify: bool = True,
         expect_digest: str | None = None, fit_memory=None, fit_params=None, fit_speedup=None,
         fit_options: dict | None = None, refit: str = "none", ridge: float = DEFAULT_RIDGE) -> nn.Module:
    """The slice of `artifact` (an Artifact or its path) at `sparsity` (or `plan`, or the largest that fits
    `fit_memory` / `fit_params` / `fit_speedup`: budget.fit, with `fit_options` its other keywords) as a compact
    model; `tp_size` / `channel_multiple` round each layer's widths for deployment (see plan.plan_slice).
    On a GPU a rank-ordered slice (or one that keeps everything) is cut on the host as on the CPU and only its
    compact tensors are copied over (upload.py: threads, pinned buffers), so it moves its own bytes, not the dense
    model's. A source-order slice there, or any slice with gather="device", has its dense tensors read whole onto
    the device and gathered with the ragged kernels (on the CPU through Triton's interpreter when
    TRITON_INTERPRET=1: slow, for tests).
    refit="ls" | "ec" corrects o_proj / down_proj from the artifact's calibration windows (slicing/correction.py,
    `ridge` relative, see gisp_deploy/refit.py); an artifact without them loads plain, with a notice."""
    device = pick_device(str(device))  # "cuda" without a GPU: one clear error before any work, not pin_memory's
    if not hasattr(artifact, "ranking"):  # an Artifact object was verified when it was loaded
        artifact = load_artifact(artifact, verify=verify, expect_digest=expect_digest)
    plan = plan or budget_plan(artifact, sparsity, fit_memory=fit_memory, fit_params=fit_params,
                               fit_speedup=fit_speedup, fit_options=fit_options, dtype=dtype, tp_size=tp_size,
                               channel_multiple=channel_multiple)
    if plan is None:
        if sparsity is None:
            raise ValueError("pass a sparsity, a plan or a budget (fit_memory=, fit_params=)")
        plan = plan_slice(artifact.ranking, sparsity, tp_size=tp_size, channel_multiple=channel_multiple)
    elif plan.shape != artifact.shape:
        raise ValueError("the plan was made for a model of another shape than the artifact's")
    if gather not in ("auto", "device"):
        raise ValueError(f"gather={gather!r}: choose auto or device")
    if refit not in REFITS:
        raise ValueError(f"refit={refit!r}: choose {', '.join(REFITS)}")
    windows = statistics_or_notice(artifact, refit)
    layouts = plan_layouts(plan)
    config = compact_config(artifact.config, plan, dtype)
    if windows is not None:
        config.gisp_refit = refit_record(refit, ridge, artifact)
    from_source = not artifact.manifest["weights"]["copied"]
    copy_mapped = plan.kept_params < plan.shape.total_params
    rank_ordered = artifact.manifest.get(LAYOUT_KEY) == RANK_ORDERED
    if copy_mapped and not rank_ordered:
        _source_order_notice(artifact)
    # on a GPU a source-order slice's tensors are gathered there: cut on the host they took 1.6x as long (H200)
    on_device = gather == "device" or (device.type != "cpu" and copy_mapped and not rank_ordered)
    read_dev = str(device) if on_device and device.type != "cpu" else "cpu"
    with WeightReader(artifact.weights_dir, read_dev, links_may_leave=from_source) as reader, CopyPool() as copies:
        started = None  # the model is built and put together while the copies fill its tensors
        if copy_mapped and not on_device:
            started = start_sliced_reads(reader, layouts, plan.shape.head_dim, dtype, copies)
        model = build_model(config, attn_implementation)
        host = "cpu" if not on_device else device
        sd = read_state_dict(reader, model, layouts, plan.shape.head_dim, host, dtype, copy_mapped=copy_mapped,
                             on_device=on_device, copies=copies, started=started)
        if device.type != "cpu" and not on_device:
            copies.wait()
            sd = upload(sd, device)
        _assemble(model, sd, device)
        del sd
        _load_generation_config(model, artifact.path)
        copies.wait()
    if windows is not None:
        dense_config = copy.deepcopy(artifact.config)
        dense_config._attn_implementation = model.config._attn_implementation
        with WeightReader(artifact.weights_dir, "cpu", links_may_leave=from_source) as reader:
            correct(model, reader, dense_config, layouts, windows, refit, ridge, plan.shape.head_dim,
                    cache_key=artifact.digest)
    return model


def _source_order_notice(artifact) -> None:
    """Once per artifact: a source-order artifact's slices are copied out of the dense tensors, not mapped."""
    if str(artifact.path) in _NOTICED:
        return
    _NOTICED.add(str(artifact.path))
    sys.stderr.write(f"notice: {artifact.path} is in source order, so a slice's kept rows and columns are copied out "
                     "of every dense tensor (2-4x the time of its bytes on the CPU, slower than the dense model on a "
                     "GPU; README, 'Load time'). "
                     f"`gisp-deploy reorder {artifact.path} --out DIR` rewrites it once; every slice of the result "
                     "is mapped from its files like a dense model.\n")


def _assemble(model: nn.Module, sd: dict, device) -> None:
    """Put `sd` into the meta-device `model` (assigned, not copied), tie its weights, make its buffers, and
    switch it to eval mode: none of it reads the tensors' values."""
    missing, unexpected = _assign(model, sd)
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


def _assign(model: nn.Module, sd: dict) -> tuple[list[str], list[str]]:
    """model.load_state_dict(sd, strict=False, assign=True) for a model of plain modules, without its per-module
    machinery (a third of the time it took to put a 1.5B slice together): each parameter becomes its tensor in
    `sd`, keeping its requires_grad; persistent buffers are replaced likewise. The missing and unexpected keys."""
    left = dict(sd)
    missing = []
    for prefix, module in model.named_modules():
        prefix = f"{prefix}." if prefix else ""
        for name, p in module._parameters.items():
            if p is None:
                continue
            t = left.pop(prefix + name, None)
            if t is None:
                missing.append(prefix + name)
            else:
                module._parameters[name] = nn.Parameter(t, requires_grad=p.requires_grad)
        for name in module._buffers:
            if name not in module._non_persistent_buffers_set:
                t = left.pop(prefix + name, None)
                if t is None:
                    missing.append(prefix + name)
                else:
                    module._buffers[name] = t
    return missing, list(left)


def _load_generation_config(model, path: Path) -> None:
    if (Path(path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)

