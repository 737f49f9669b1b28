"""Hugging Face files as gisp-deploy opens them: devices, dtypes, tokenizers and dense models."""

from __future__ import annotations

from pathlib import Path

import torch

from .arguments import DTYPE_NAMES
from .artifact import ArtifactError, check_weights_dir
from .integrity import refuse_remote_code

# Every dtype name a command accepts (vLLM's spellings too); the safetensors codes are safetensors_file.py's.
DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible; use --device cpu")
    return dev


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if model_dir.is_dir() and not any((model_dir / f).is_file() for f in TOKENIZER_FILES) \
            and not any(model_dir.glob("*.tiktoken")):
        raise ArtifactError(f"{model_dir}: no tokenizer (tokenizer.json or tokenizer.model, with "
                            "tokenizer_config.json); copy the tokenizer files of the source model into it")
    refuse_remote_code(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:
        detail = " ".join(str(e).split())[:160]  # one line: transformers' messages span several
        raise ArtifactError(f"{model_dir}: cannot load a tokenizer ({type(e).__name__}: {detail}); the directory "
                            "needs tokenizer.json (or tokenizer.model) and tokenizer_config.json, as the source "
                            "model has them") from None


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype, links_may_leave: bool = False):
    """The dense model of a directory through transformers: safetensors only, no code, nothing outside it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_weights_dir(model_dir, links_may_leave)
    refuse_remote_code(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False)
    return model.to(device).eval()
