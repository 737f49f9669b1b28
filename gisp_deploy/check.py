"""`gisp-deploy check`: guard every deployed size of an artifact in CI (integrity, nesting, exactness, quality)."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .artifact import load_artifact
from .data import token_stream
from .evaluate import OracleSlicer, perplexity
from .loader import load
from .plan import plan_slice
from .tasks import task_accuracy


@dataclass
class CheckResult:
    name: str
    ok: bool
    message: str
    seconds: float = 0.0


class Checker:
    """Runs named checks, records each outcome, and keeps going after a failure."""

    def __init__(self, progress=None):
        self.results: list[CheckResult] = []
        self.progress = progress

    def run(self, name: str, fn) -> object:
        t = time.perf_counter()
        try:
            value, message = fn()
            self.results.append(CheckResult(name, True, message, time.perf_counter() - t))
            return value
        except Exception as e:  # a failed check is a result, not a crash
            self.results.append(CheckResult(name, False, f"{type(e).__name__}: {e}", time.perf_counter() - t))
            return None
        finally:
            if self.progress:
                self.progress(self.results[-1])

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


def _probe_ids(tokenizer, text, vocab: int, batch: int = 2, length: int = 64) -> torch.Tensor:
    if text:
        stream = token_stream(tokenizer, [text])[: batch * length]
        if len(stream) == batch * length:
            return stream.view(batch, length)
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def check_artifact(path, sparsities, *, text=None, seq_len: int = 128, max_tokens: int = 16384,
                   max_ppl_ratio: float | None = None, task=None, min_accuracy: float | None = None,
                   tp_size: int = 1, channel_multiple: int = 1, atol: float = 1e-3, progress=None) -> Checker:
    """Every check of one artifact at `sparsities`; see Checker.results."""
    from .prune_run import load_model, load_tokenizer

    c = Checker(progress)
    art = c.run("artifact: manifest and ranking sha256", lambda: (load_artifact(path), "readable, ranking intact"))
    if art is None:
        return c
    c.run("artifact: weight files sha256", lambda: (art.verify_weights(), f"{len(art.manifest['weights']['sha256'])} "
                                                                          "files match the manifest"))
    plans = {}
    for s in sorted(sparsities):
        plans[s] = c.run(f"s={s:g}: slice plan", lambda s=s: _plan(art, s, tp_size, channel_multiple))

    def nested():
        ordered = [p for _, p in sorted(plans.items()) if p is not None]
        for small, big in zip(ordered, ordered[1:]):
            for i, (a, b) in enumerate(zip(small.layers, big.layers)):
                for field in ("q_heads", "kv_heads", "channels"):
                    if not set(getattr(b, field)) <= set(getattr(a, field)):
                        raise AssertionError(f"layer {i}: {field} at s={big.sparsity:g} not within s={small.sparsity:g}")
        return None, f"{len(ordered)} slices nested"
    c.run("slices nested", nested)

    tok = load_tokenizer(art.path)
    dense = load_model(art.weights_dir, torch.device("cpu"), torch.float32)
    oracle = OracleSlicer(dense)
    ids = _probe_ids(tok, text, art.config.vocab_size)
    stream = token_stream(tok, [text])[:max_tokens] if text else None
    base_ppl = None
    if stream is not None and max_ppl_ratio is not None:
        base_ppl = c.run("dense: perplexity", lambda: _ppl(dense, stream, seq_len))
    for s, plan in sorted(plans.items()):
        if plan is None:
            continue
        model = c.run(f"s={s:g}: loads", lambda plan=plan: _load(art, plan))
        if model is None:
            continue
        c.run(f"s={s:g}: matches the oracle", lambda model=model, plan=plan: _exact(model, oracle.apply(plan), ids, atol))
        if stream is not None and max_ppl_ratio is not None and base_ppl is not None:
            c.run(f"s={s:g}: perplexity within {max_ppl_ratio:g}x dense",
                  lambda model=model: _ppl_ratio(model, stream, seq_len, base_ppl, max_ppl_ratio))
        if task is not None and min_accuracy is not None:
            c.run(f"s={s:g}: accuracy >= {min_accuracy:g}", lambda model=model: _accuracy(model, tok, task, min_accuracy))
        del model
    return c


def _plan(art, s, tp_size, channel_multiple):
    plan = plan_slice(art.ranking, s, tp_size=tp_size, channel_multiple=channel_multiple)
    return plan, f"achieved sparsity {plan.achieved_sparsity:.4f}, {plan.kept_params:,} decoder parameters kept"


def _load(art, plan):
    t = time.perf_counter()
    model = load(art, plan=plan)
    return model, f"compact model in {time.perf_counter() - t:.2f} s"


@torch.no_grad()
def _exact(model, oracle, ids, atol):
    got, want = model(ids).logits, oracle(ids).logits
    diff = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    if diff > atol * scale:
        raise AssertionError(f"max |logit difference| {diff:.3g} exceeds {atol:g} x {scale:.3g}")
    same = torch.equal(got.argmax(-1), want.argmax(-1))
    if not same:
        raise AssertionError("greedy next tokens differ from the oracle's")
    return None, f"max |logit difference| {diff:.2e} on a {tuple(ids.shape)} probe; greedy tokens identical"


def _ppl(model, stream, seq_len):
    ppl, n = perplexity(model, stream, seq_len)
    return ppl, f"{ppl:.2f} over {n} tokens"


def _ppl_ratio(model, stream, seq_len, base, limit):
    ppl, _ = perplexity(model, stream, seq_len)
    if ppl > limit * base:
        raise AssertionError(f"perplexity {ppl:.2f} is {ppl / base:.2f}x the dense {base:.2f} (limit {limit:g}x)")
    return ppl, f"{ppl:.2f} = {ppl / base:.2f}x dense"


def _accuracy(model, tok, task, minimum):
    acc = task_accuracy(model, tok, task)
    if acc["accuracy"] < minimum:
        raise AssertionError(f"accuracy {acc['accuracy']:.3f} on {acc['items']} items is below {minimum:g}")
    return acc, f"{acc['accuracy']:.3f} on {acc['items']} items"


def write_junit(checker: Checker, path: Path, suite: str) -> None:
    failures = sum(not r.ok for r in checker.results)
    root = ET.Element("testsuite", name=suite, tests=str(len(checker.results)), failures=str(failures),
                      errors="0", time=f"{sum(r.seconds for r in checker.results):.3f}")
    for r in checker.results:
        case = ET.SubElement(root, "testcase", classname=suite, name=r.name, time=f"{r.seconds:.3f}")
        if r.ok:
            ET.SubElement(case, "system-out").text = r.message
        else:
            ET.SubElement(case, "failure", message=r.message).text = r.message
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def write_json(checker: Checker, path: Path, artifact: str) -> None:
    Path(path).write_text(json.dumps({"artifact": artifact, "ok": checker.ok,
                                      "results": [asdict(r) for r in checker.results]}, indent=2) + "\n")
