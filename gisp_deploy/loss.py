"""The loss every objective and every evaluation shares: mean NLL of each sequence's loss-masked tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def sequence_nll(model: nn.Module, input_ids, attention_mask, loss_mask, hidden=None) -> torch.Tensor:
    """Mean NLL over each sequence's loss-masked target tokens: [B]. With `hidden` ([B, T, D]), the model's
    layers (truncated by LeadingCache.skipping) start from those hidden states instead of the embeddings."""
    if hidden is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [B, T, V]
    else:
        logits = model(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).logits
    targets = input_ids[:, 1:]  # [B, T-1]
    mask = loss_mask[:, 1:].to(torch.float32)  # [B, T-1]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # [B, T-1]
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)
