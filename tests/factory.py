"""Tiny random-weight models of every supported family, saved as users' files would be."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MODEL = ROOT / "examples" / "tiny-llama-gqa-19m"
EXAMPLE_TRAIN = ROOT / "examples" / "data" / "train"
EXAMPLE_HELDOUT = ROOT / "examples" / "data" / "heldout" / "persuasion.txt.gz"
CALIB_TEXT = EXAMPLE_TRAIN / "austen_northangerabbey.txt.gz"

# name -> (model_type, overrides); every family in MHA and GQA form
FAMILIES = {
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-gqa": ("llama", {}),
    "mistral-gqa": ("mistral", {}),
    "qwen2-gqa": ("qwen2", {}),
    "qwen2-mha": ("qwen2", {"num_key_value_heads": 4}),
    "qwen3-gqa": ("qwen3", {}),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=8192, max_position_embeddings=256,
              bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def make_model_dir(root: Path, name: str, seed: int = 0, **overrides) -> Path:
    """Write a random-weight model of family `name` (see FAMILIES) with the example tokenizer."""
    from transformers import AutoModelForCausalLM

    model_type, base = FAMILIES[name]
    cfg = tiny_config(model_type, **{**base, **overrides})
    cfg.architectures = [type(AutoModelForCausalLM.from_config(cfg)).__name__]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so scores differ clearly
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif n.endswith(".bias"):
                p.normal_(0, 0.1)
    out = Path(root) / name
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EXAMPLE_MODEL / f, out / f)
    return out
