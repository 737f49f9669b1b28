"""Calibration and evaluation data: text files, folders and JSONL -> token batches."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .arguments import HUB_PREFIX

TEXT_SUFFIXES = (".txt", ".txt.gz", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


class DataError(ValueError):
    pass


def _is(path: Path, suffixes) -> bool:
    return any(path.name.endswith(s) for s in suffixes)


def expand_paths(paths) -> list[Path]:
    """Files given directly, plus every text/JSONL file under given folders (sorted); `hf://NAME` is a Hugging Face
    dataset (its train split's text). A local path that does not exist is an error, never a hub request."""
    out: list[Path] = []
    for raw in paths:
        if str(raw).startswith(HUB_PREFIX):  # the hub only when asked for by name
            out.extend(_hub_dataset(str(raw)[len(HUB_PREFIX):]))
            continue
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _is(f, TEXT_SUFFIXES + JSONL_SUFFIXES))
            if not found:
                raise DataError(f"{p}: folder holds no .txt, .txt.gz or .jsonl files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise DataError(f"{p}: not a regular file or folder")
        else:
            raise DataError(f"{p}: no such file or folder (a Hugging Face dataset is read only when named "
                            f"{HUB_PREFIX}NAME, e.g. {HUB_PREFIX}allenai/c4)")
    return out


def _hub_dataset(name: str) -> list[Path]:
    """A Hugging Face dataset (asked for as hf://NAME), cached as a local text file; offline a clear error."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(f"{HUB_PREFIX}{name}: reading a hub dataset needs the `datasets` package (pip install "
                        "datasets); or pass a local .txt/.txt.gz/.jsonl path") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # network or name errors are all the same to the user
        raise DataError(f"{HUB_PREFIX}{name}: loading it from the hub failed ({type(e).__name__}: "
                        f"{str(e)[:200]}); offline, pass a local .txt/.txt.gz/.jsonl path") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "gisp-deploy" / (name.replace("/", "__") + ".txt")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("\n\n".join(str(x) for x in ds[column]), encoding="utf-8")
    return [cache]


def read_text(path: Path) -> str:
    raw = gzip.open(path, "rb").read() if path.name.endswith(".gz") else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                        "convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return rows


def tokenize_text(tokenizer, text: str, chunk_chars: int = 1 << 16) -> list[int]:
    """Token ids of a long text, tokenized in newline-aligned chunks so fast tokenizers can batch."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        chunks.append(text[start:end])
        start = end
    ids: list[int] = []
    for enc in tokenizer(chunks, add_special_tokens=False)["input_ids"] if chunks else []:
        ids.extend(enc)
    return ids


def token_stream(tokenizer, paths) -> torch.Tensor:
    """All text files' tokens, one document after another, separated by EOS when the tokenizer has one."""
    files = expand_paths(paths)
    texts = [f for f in files if not _is(f, JSONL_SUFFIXES)]
    if not texts:
        raise DataError(f"no text files among {', '.join(map(str, paths))}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for f in texts:
        ids.extend(tokenize_text(tokenizer, read_text(f)))
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Calibration:
    """Token sequences with per-token loss masks and per-sequence signed weights.

    The objective's gradient is sum_i weight_i * grad(mean NLL over the masked tokens of sequence i).
    """

    input_ids: torch.Tensor  # [N, T] (right-padded)
    attention_mask: torch.Tensor  # [N, T]
    loss_mask: torch.Tensor  # [N, T] 1 where token t is predicted and counted in the loss
    weight: torch.Tensor  # [N] float64
    objective: str
    source_files: tuple[str, ...]

    @property
    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for t in (self.input_ids, self.attention_mask, self.loss_mask):
            h.update(t.to(torch.int32).numpy().tobytes())
        h.update(self.weight.numpy().tobytes())
        return {"sha256": h.hexdigest(), "samples": int(self.input_ids.shape[0]),
                "seq_len": int(self.input_ids.shape[1]), "objective": self.objective,
                "files": list(self.source_files)}

    def batches(self, batch_size: int):
        for i in range(0, self.input_ids.shape[0], batch_size):
            sl = slice(i, i + batch_size)
            yield self.input_ids[sl], self.attention_mask[sl], self.loss_mask[sl], self.weight[sl]

    def select(self, rows: slice) -> "Calibration":
        """The sequences at `rows`, each keeping its weight (so sums over parts add up to the whole)."""
        return replace(self, input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
                                   loss_mask=self.loss_mask[rows], weight=self.weight[rows])


def lm_calibration(tokenizer, paths, samples: int, seq_len: int, seed: int) -> Calibration:
    """`samples` random `seq_len`-token windows of the text, loss on every token."""
    if samples < 1 or seq_len < 2:
        raise DataError(f"need samples >= 1 and seq_len >= 2 (got {samples}, {seq_len})")
    stream = token_stream(tokenizer, paths)
    if len(stream) < seq_len:
        raise DataError(f"calibration text has {len(stream)} tokens, shorter than one sample of {seq_len}; "
                        "pass more text or a smaller --seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (samples,), generator=gen)
    ids = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
    ones = torch.ones_like(ids)
    return Calibration(ids, ones, ones, torch.full((samples,), 1.0 / samples, dtype=torch.float64), "lm",
                       tuple(str(p) for p in paths))


def encode_pair(tokenizer, prompt: str, target: str, seq_len: int) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not t:
        raise DataError(f"answer {target!r} tokenizes to nothing")
    t = t[: seq_len - 1]
    if len(p) + len(t) > seq_len:
        p = p[len(p) + len(t) - seq_len:]
    if not p and tokenizer.bos_token_id is not None:
        p = [tokenizer.bos_token_id]
    if not p:
        raise DataError(f"prompt for answer {target!r} is empty; the first answer token needs context")
    return p + t, [0] * len(p) + [1] * len(t)


def _pad(tokenizer, seqs, masks, weights, objective, paths) -> Calibration:
    T = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    lm = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        lm[i, :len(s)] = torch.tensor(m)
    return Calibration(ids, att, lm, torch.tensor(weights, dtype=torch.float64), objective,
                       tuple(str(p) for p in paths))


def _records(paths) -> list[tuple[Path, dict]]:
    files = expand_paths(paths)
    rows = [(f, r) for f in files if _is(f, JSONL_SUFFIXES) for r in read_jsonl(f)]
    if not rows:
        raise DataError(f"no JSONL records in {', '.join(map(str, paths))}; this objective reads .jsonl files")
    return rows


def margin_calibration(tokenizer, paths, samples: int, seq_len: int, seed: int) -> Calibration:
    """Multiple-choice records {prompt, choices, answer}: each option its own sequence, loss on the
    option tokens; correct options weigh +1/N+, wrong ones -1/N- (the margin objective)."""
    rows = _subsample(_records(paths), samples, seed)
    seqs, masks, correct = [], [], []
    for f, r in rows:
        if not {"prompt", "choices", "answer"} <= set(r) or not isinstance(r["choices"], list):
            raise DataError(f"{f}: margin records need 'prompt', 'choices' (list) and 'answer' (index); got {sorted(r)}")
        ans = r["answer"]
        if not isinstance(ans, int) or not 0 <= ans < len(r["choices"]) or len(r["choices"]) < 2:
            raise DataError(f"{f}: 'answer' must index one of at least two 'choices' (got {ans!r})")
        for j, choice in enumerate(r["choices"]):
            s, m = encode_pair(tokenizer, r["prompt"], choice, seq_len)
            seqs.append(s), masks.append(m), correct.append(j == ans)
    n_pos = sum(correct)
    n_neg = len(correct) - n_pos
    weights = [1.0 / n_pos if c else -1.0 / n_neg for c in correct]
    return _pad(tokenizer, seqs, masks, weights, "margin", paths)


def answer_calibration(tokenizer, paths, samples: int, seq_len: int, seed: int) -> Calibration:
    """Records {prompt, answer} (or {question, answer}, formatted "Q: {question}\\nA: "): loss on the answer."""
    rows = _subsample(_records(paths), samples, seed)
    seqs, masks = [], []
    for f, r in rows:
        if "answer" not in r or not ({"prompt", "question"} & set(r)):
            raise DataError(f"{f}: answer records need 'prompt' (or 'question') and 'answer'; got {sorted(r)}")
        prompt = r["prompt"] if "prompt" in r else f"Q: {r['question']}\nA: "
        s, m = encode_pair(tokenizer, prompt, str(r["answer"]), seq_len)
        seqs.append(s), masks.append(m)
    return _pad(tokenizer, seqs, masks, [1.0 / len(seqs)] * len(seqs), "answer", paths)


def _subsample(rows, samples: int, seed: int):
    if samples >= len(rows):
        return rows
    gen = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(rows), generator=gen)[:samples].tolist())
    return [rows[i] for i in keep]


OBJECTIVES = {"lm": lm_calibration, "margin": margin_calibration, "answer": answer_calibration}


def load_calibration(objective: str, tokenizer, paths, samples: int, seq_len: int, seed: int) -> Calibration:
    if objective not in OBJECTIVES:
        raise DataError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not paths:
        raise DataError("no calibration data; pass --calib PATH (text files, folders or JSONL)")
    return OBJECTIVES[objective](tokenizer, paths, samples, seq_len, seed)
