"""Placing a model too large for one GPU over several (and CPU memory) for scoring, with accelerate."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import torch

from ..artifact import check_weights_dir

DEVICE_MAPS = ("auto", "balanced", "sequential")
GRAD_BYTES = 4  # the fp32 gradient sum kept next to each scored weight
ACTIVATION_SHARE = 0.15  # of each GPU's free memory, left for activations of the micro-batches


def plan_placement(model_dir: Path, dtype: torch.dtype, strategy: str, max_memory: dict | None = None) -> dict:
    """A device map (module name -> GPU index or "cpu") for scoring a model too large for one device.

    accelerate sizes it from the weights alone, so each device is offered only the share of its memory that
    the weights may take: the fp32 gradient sums of the scored weights sit next to them on the same device."""
    if strategy not in DEVICE_MAPS:
        raise ValueError(f"--device-map {strategy!r}: choose one of {', '.join(DEVICE_MAPS)}")
    try:
        from accelerate import infer_auto_device_map, init_empty_weights
        from accelerate.utils import get_balanced_memory, get_max_memory
    except ImportError:
        raise ValueError("--device-map needs accelerate: pip install accelerate") from None
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, trust_remote_code=False),
                                                dtype=dtype)
    share = dtype.itemsize / (dtype.itemsize + GRAD_BYTES)
    if max_memory is None:
        max_memory = {k: int(v * share * (1 - ACTIVATION_SHARE if k != "cpu" else 1))
                      for k, v in get_max_memory().items()}
    no_split = meta._no_split_modules
    if strategy in ("auto", "balanced") and any(k != "cpu" for k in max_memory):
        max_memory = get_balanced_memory(meta, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    placement = infer_auto_device_map(meta, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if "disk" in placement.values():
        need = sum(p.numel() for p in meta.parameters()) * (dtype.itemsize + GRAD_BYTES) / 2**30
        raise ValueError(f"the model needs about {need:.0f} GiB for weights and fp32 gradient sums, more than the "
                         "visible GPUs and CPU memory hold; use more GPUs or a machine with more memory")
    return placement


def load_placed(model_dir: Path, dtype: torch.dtype, placement: dict):
    """The model with its layers on the devices of `placement`. Layers placed on "cpu" stay there and run
    there (slowly): their weights must stay real tensors to receive gradients, so they are not offloaded."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_weights_dir(model_dir, links_may_leave=True)
    if "cpu" not in placement.values():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                     device_map=placement, trust_remote_code=False)
    else:  # transformers would offload the CPU part (weights on meta, no gradients): dispatch it ourselves
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
        quiet = logging.getLogger("accelerate.big_modeling")  # it warns of offloading whenever "cpu" is named
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            model = dispatch_model(model, device_map=placement, main_device="cpu")
        finally:
            quiet.setLevel(level)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters offloaded by accelerate cannot receive gradients: {left[:3]}...")
    return model.eval()


def describe_placement(placement: dict) -> str:
    """E.g. "0: 17 modules, 1: 16 modules, cpu: 2 modules"."""
    if set(placement) == {""}:
        return f"all on {placement['']}"
    counts = collections.Counter(placement.values())
    return ", ".join(f"{d}: {n} module{'s' * (n != 1)}" for d, n in counts.items())

