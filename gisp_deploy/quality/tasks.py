"""Decision tasks: build a 'true continuation among N' task from text, and score multiple-choice accuracy."""

from __future__ import annotations

import bisect
import itertools
import json
from pathlib import Path
from typing import Callable

import torch

from ..data import encode_pair, read_jsonl, token_stream
from ..loss import sequence_nll

# progress(description, total, unit) -> advance(n): told of each pass (a text's tokens, a task's items) before it
# starts, with its total; advance(n) as n more are done, so the advances of a pass sum to its total.
Progress = Callable[[str, int, str], Callable[[int], None]]


def build_continuation_task(tokenizer, paths, n: int, context_tokens: int = 48, continuation_tokens: int = 12,
                            choices: int = 4, seed: int = 0, nearby: int = 8) -> list[dict]:
    """n records {prompt, choices, answer}: a passage, its true continuation and `choices - 1` continuations
    taken from within `nearby` items of it in the same text (same topic, so the choice needs the context).
    Every passage starts at the beginning of a word. The margin format; {prompt, answer} rows made from it are the
    answer format."""
    stream = token_stream(tokenizer, paths)
    span = context_tokens + continuation_tokens
    slot = span + WORD_SLACK  # room to move each item's start to a word's beginning
    slots = len(stream) // slot
    if slots < max(n, 2 * nearby + 1):
        raise ValueError(f"text has {len(stream)} tokens: {slots} items of {slot} tokens, fewer than the {n} asked for")
    starts: dict[int, int] = {}

    def start_of(k: int) -> int:
        if k not in starts:
            starts[k] = _word_start(tokenizer, stream, k * slot)
        return starts[k]

    gen = torch.Generator().manual_seed(seed)
    bases = torch.randperm(slots, generator=gen)[:n].tolist()
    rows = []
    for base in bases:
        near = [o for o in range(max(0, base - nearby), min(slots, base + nearby + 1)) if o != base]
        others = [near[i] for i in torch.randperm(len(near), generator=gen)[:choices - 1].tolist()]
        start = start_of(base)
        prompt = tokenizer.decode(stream[start:start + context_tokens]).lstrip()
        true = tokenizer.decode(stream[start + context_tokens:start + span])
        wrong = [tokenizer.decode(stream[start_of(o) + context_tokens:start_of(o) + span]) for o in others]
        answer = int(torch.randint(0, choices, (1,), generator=gen))
        rows.append({"prompt": prompt, "choices": wrong[:answer] + [true] + wrong[answer:], "answer": answer})
    return rows


WORD_SLACK = 8


def _word_start(tokenizer, stream: list[int], at: int) -> int:
    """The first position in [at, at + WORD_SLACK) whose token begins a word, else `at`: its token carries the
    word-start mark of byte-level BPE (Ġ) or SentencePiece (▁), or the token before it ends in whitespace."""
    for i in range(at, min(at + WORD_SLACK, len(stream))):
        if i == 0 or str(tokenizer.convert_ids_to_tokens(int(stream[i]))).startswith(("Ġ", "▁")) or \
                tokenizer.decode(stream[i - 1:i])[-1:].isspace():
            return i
    return at


def write_jsonl(rows: list[dict], path: Path) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@torch.no_grad()
def task_accuracy(model, tokenizer, path, seq_len: int = 512, batch_size: int = 16,
                  progress: Progress | None = None) -> dict:
    """Multiple-choice accuracy: the option with the highest total log-likelihood given the prompt
    (lm-eval's `acc`), and with the highest per-token log-likelihood (`acc_norm`-style). `progress` is told of
    one pass named after the file, counted in items (an item is done when its last option is scored)."""
    rows = read_jsonl(Path(path))
    advance = progress(Path(path).name, len(rows), "items") if progress else None
    seqs, masks, owner = [], [], []
    for i, r in enumerate(rows):
        for choice in r["choices"]:
            s, m = encode_pair(tokenizer, r["prompt"], choice, seq_len)
            seqs.append(s), masks.append(m), owner.append(i)
    ends = list(itertools.accumulate(len(r["choices"]) for r in rows))  # item i's options end at ends[i]
    done = 0
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, mean = [], []
    for b in range(0, len(seqs), batch_size):
        chunk = list(range(b, min(b + batch_size, len(seqs))))
        T = max(len(seqs[j]) for j in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        lm = torch.zeros_like(ids)
        for r, j in enumerate(chunk):
            ids[r, :len(seqs[j])] = torch.tensor(seqs[j])
            att[r, :len(seqs[j])] = 1
            lm[r, :len(seqs[j])] = torch.tensor(masks[j])
        nll = sequence_nll(model, ids.to(dev), att.to(dev), lm.to(dev)).double().cpu()  # [B] mean over option
        count = lm[:, 1:].sum(1).double()
        mean += (-nll).tolist()
        total += (-nll * count).tolist()
        if advance:
            now = bisect.bisect_right(ends, chunk[-1] + 1)  # items whose every option is scored
            advance(now - done)
            done = now
    correct = correct_norm = 0
    for i, r in enumerate(rows):
        idx = [j for j, o in enumerate(owner) if o == i]
        correct += int(max(range(len(idx)), key=lambda k: total[idx[k]]) == r["answer"])
        correct_norm += int(max(range(len(idx)), key=lambda k: mean[idx[k]]) == r["answer"])
    options = [len(r["choices"]) for r in rows]
    return {"task": Path(path).name, "items": len(rows), "accuracy": correct / len(rows),
            "accuracy_norm": correct_norm / len(rows),
            # options per item (their mean when items differ) and the accuracy of guessing: plots draw it
            "choices": options[0] if len(set(options)) == 1 else sum(options) / len(options),
            "chance": sum(1 / k for k in options) / len(options)}
