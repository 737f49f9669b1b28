"""`gisp-deploy check`: guard every deployed size of an artifact in CI (integrity, nesting, exactness, quality).

Each check is a named PASS/FAIL result; a failed check never stops the others. With `serve=True` each slice is
also run by vLLM (vllm_greedy.py) and its greedy tokens on probe prompts must equal the compact model's.
"""

from __future__ import annotations

import json
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..artifact import load_artifact
from ..data import token_stream
from ..hf import load_model, load_tokenizer
from ..plan import plan_slice
from ..arguments import check_one_size, parse_sparsities
from ..budget import budget_plan
from ..slicing.loader import load
from ..slicing.oracle import OracleSlicer, corrected_oracle
from .evaluate import perplexity
from .lm_eval import check_options, prepare_tasks, run_lm_eval, split_tasks
from .tasks import task_accuracy
from .vllm_greedy import SERVE_TIMEOUT_S, compare_greedy, greedy_reference, vllm_greedy_tokens

SERVE_PROMPT_TOKENS = 24  # the first tokens of each probe row are vLLM's prompts
SERVE_NEW_TOKENS = 16


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

    def run(self, name: str, fn, *args, extra_seconds: float = 0.0) -> object:
        """fn(*args) -> (value, message): PASS with the message, or FAIL with the exception it raised. The
        result's time is fn's, plus `extra_seconds` spent on it elsewhere (vLLM's child process)."""
        t = time.perf_counter()
        try:
            value, message = fn(*args)
            ok = True
        except Exception as e:  # a failed check is a result, not a crash
            value, message, ok = None, f"{type(e).__name__}: {e}", False
        self.results.append(CheckResult(name, ok, message, time.perf_counter() - t + extra_seconds))
        if self.progress:
            self.progress(self.results[-1])
        return value

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


@dataclass(frozen=True)
class CheckOptions:
    sparsities: tuple[float, ...]
    text: Path | None = None
    seq_len: int = 128
    max_tokens: int = 16384
    max_ppl_ratio: float | None = None
    task: Path | None = None
    min_accuracy: float | None = None
    tp_size: int = 1
    channel_multiple: int = 1
    atol: float = 1e-3
    serve: bool = False
    serve_timeout: float = SERVE_TIMEOUT_S
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | None = None
    min_lm_eval_acc: float | None = None
    refit: str = "none"

    def __post_init__(self):
        if self.max_ppl_ratio is not None and self.text is None:
            raise ValueError("--max-ppl-ratio needs --text FILE to measure perplexity on")
        if self.min_accuracy is not None and self.task is None:
            raise ValueError("--min-accuracy needs --task FILE.jsonl")
        if self.min_lm_eval_acc is not None and not self.lm_eval_tasks:
            raise ValueError("--min-lm-eval-acc needs --lm-eval-tasks TASK[,TASK]")
        check_options(self.lm_eval_limit)


DEFAULT_SPARSITIES = (0.2, 0.4, 0.5)


def check(artifact, sparsities=None, *, text=None, seq_len: int = 128, max_tokens: int = 16384,
          max_ppl_ratio: float | None = None, task=None, min_accuracy: float | None = None, tp_size: int = 1,
          channel_multiple: int = 1, atol: float = 1e-3, serve: bool = False,
          serve_timeout: float = SERVE_TIMEOUT_S, junit=None, json_report=None, progress=None, lm_eval_tasks=(),
          lm_eval_limit: int | None = None, min_lm_eval_acc: float | None = None, fit_memory=None, fit_params=None,
          fit_speedup=None, fit_options: dict | None = None, refit: str = "none") -> Checker:
    """`gisp-deploy check` from Python: every check of `artifact` at `sparsities` (see Checker.results);
    `progress` sees each result as it is decided. `serve`: also compare vLLM's greedy tokens with the compact
    model's on every slice (needs vLLM). `lm_eval_tasks` (names or task YAML paths) run on every slice, and
    with `min_lm_eval_acc` each task's lm-eval `acc` is a gate. The JUnit / JSON reports are written whatever
    happens. A budget (fit_memory / fit_params / fit_speedup, fit_options: budget.fit's other keywords) instead
    of sparsities checks the one slice it chooses (sparsities default to 0.2, 0.4, 0.5).
    `refit`: each slice is loaded corrected and compared with the corrected oracle
    (slicing.oracle.corrected_oracle, on the artifact's calibration windows)."""
    if serve:  # before anything is loaded
        from ..serving.process import require_vllm

        require_vllm()
    check_one_size(sparsities, fit_memory, fit_params, fit_speedup)
    chosen = budget_plan(artifact, None, fit_memory=fit_memory, fit_params=fit_params, fit_speedup=fit_speedup,
                         fit_options=fit_options, tp_size=tp_size, channel_multiple=channel_multiple)
    sparsities = [chosen.sparsity] if chosen else DEFAULT_SPARSITIES if sparsities is None else sparsities
    opts = CheckOptions(sparsities=tuple(sorted(parse_sparsities(sparsities))), text=text, seq_len=seq_len,
                        max_tokens=max_tokens, max_ppl_ratio=max_ppl_ratio, task=task, min_accuracy=min_accuracy,
                        tp_size=tp_size, channel_multiple=channel_multiple, atol=atol, serve=serve,
                        serve_timeout=serve_timeout, lm_eval_tasks=tuple(split_tasks(lm_eval_tasks)),
                        lm_eval_limit=lm_eval_limit, min_lm_eval_acc=min_lm_eval_acc, refit=refit)
    lm_eval = prepare_tasks(opts.lm_eval_tasks) if opts.lm_eval_tasks else None  # bad task names: an error, now
    checker = Checker(progress)
    try:
        ArtifactCheck(Path(artifact), opts, checker, lm_eval).run()
    finally:
        if junit:
            write_junit(checker, junit, f"gisp-deploy check {Path(artifact).name}")
        if json_report:
            write_report(checker, json_report, str(artifact))
    return checker


class ArtifactCheck:
    """The checks of one artifact, in order: integrity, plans and nesting, then per slice loading, exactness
    against the oracle, quality gates and (optionally) vLLM."""

    def __init__(self, path: Path, opts: CheckOptions, checker: Checker, lm_eval=None):
        self.path, self.opts, self.c, self.lm_eval = path, opts, checker, lm_eval

    def run(self) -> None:
        c, opts = self.c, self.opts
        art = c.run("artifact: manifest and file sha256s", _read, self.path)
        if art is None:
            return
        c.run("artifact: weight files sha256", _weights_intact, art)
        plans = {s: c.run(f"s={s:g}: slice plan", _plan, art, s, opts) for s in opts.sparsities}
        plans = {s: p for s, p in plans.items() if p is not None}
        c.run("slices nested", _nested, list(plans.values()))
        tok = c.run("artifact: tokenizer", _tokenizer, art.path)
        ids = _probe_ids(tok, opts.text, art.config.vocab_size)
        prompts = ids[:, :SERVE_PROMPT_TOKENS].tolist()
        served = self._served(art, plans, prompts) if opts.serve else {}
        dense = c.run("dense: loads", _dense, art)
        if dense is None:
            return
        oracle = OracleSlicer(dense)
        stream = token_stream(tok, [opts.text])[:opts.max_tokens] if opts.text and tok is not None else None
        base_ppl = None
        if stream is not None and opts.max_ppl_ratio is not None:
            base_ppl = c.run("dense: perplexity", _ppl, oracle.model, stream, opts.seq_len)
        for s, plan in plans.items():
            self._slice(art, s, plan, oracle, ids, stream, base_ppl, tok, prompts, served.get(s))

    def _served(self, art, plans: dict, prompts) -> dict:
        """vLLM's greedy tokens per slice, before the dense model is loaded here: the engine's memory and ours
        never add up. A corrected slice is served as `serve --refit` serves it: exported (fp32, the
        correction in its weights) to a temporary directory that vLLM loads."""
        opts = self.opts
        sparsities = list(plans)
        try:
            if opts.refit == "none":
                return vllm_greedy_tokens(art, sparsities, prompts, SERVE_NEW_TOKENS, tp_size=opts.tp_size,
                                          channel_multiple=opts.channel_multiple, timeout=opts.serve_timeout)
            from ..slicing.export import export_slice

            with tempfile.TemporaryDirectory(prefix="gisp-check-refit-") as tmp:
                exports = {}
                for s, plan in plans.items():
                    exports[s] = Path(tmp) / f"s{s:g}"
                    export_slice(art, exports[s], plan=plan, dtype="float32", refit=opts.refit)
                return vllm_greedy_tokens(art, sparsities, prompts, SERVE_NEW_TOKENS, tp_size=opts.tp_size,
                                          channel_multiple=opts.channel_multiple, timeout=opts.serve_timeout,
                                          exports=exports)
        except Exception as e:  # noqa: BLE001 - each slice's vLLM check fails with it; the other checks still run
            return {s: {"error": f"{type(e).__name__}: {e}"} for s in sparsities}

    def _slice(self, art, s, plan, oracle, ids, stream, base_ppl, tok, prompts, served) -> None:
        c, opts = self.c, self.opts
        model = c.run(f"s={s:g}: loads", _load, art, plan, opts.refit)
        if model is None:
            return
        c.run(f"s={s:g}: matches the oracle", _exact, model, _oracle(art, plan, oracle, model), ids, opts.atol)
        if base_ppl is not None:
            c.run(f"s={s:g}: perplexity within {opts.max_ppl_ratio:g}x dense", _ppl_ratio, model, stream,
                  opts.seq_len, base_ppl, opts.max_ppl_ratio)
        if opts.min_accuracy is not None and tok is not None:
            c.run(f"s={s:g}: accuracy >= {opts.min_accuracy:g}", _accuracy, model, tok, opts.task, opts.min_accuracy)
        if self.lm_eval is not None and tok is not None:
            records = c.run(f"s={s:g}: lm-eval", _lm_eval, model, tok, self.lm_eval, opts.lm_eval_limit)
            if records and opts.min_lm_eval_acc is not None:
                for task in sorted({r["task"] for r in records}):
                    c.run(f"s={s:g}: lm-eval {task} acc >= {opts.min_lm_eval_acc:g}", _lm_eval_gate, records, task,
                          opts.min_lm_eval_acc)
        if opts.serve:
            c.run(f"s={s:g}: vLLM greedy tokens equal the compact model's", _same_as_vllm, model, prompts, served,
                  extra_seconds=(served or {}).get("seconds", 0.0))


def _probe_ids(tokenizer, text, vocab: int, batch: int = 2, length: int = 64) -> torch.Tensor:
    if text and tokenizer is not None:
        stream = token_stream(tokenizer, [text])[: batch * length]
        if len(stream) == batch * length:
            return stream.view(batch, length)
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _read(path):
    art = load_artifact(path, weights=False)
    covered = "every file but the weights" if "files" in art.manifest else "the ranking (a format-1 manifest)"
    return art, f"readable; {covered} as the manifest records; manifest sha256 {art.digest}"


def _weights_intact(art):
    art.verify_weights(use_record=False)  # CI reads every byte: what was verified elsewhere does not count here
    return None, f"{len(art.manifest['weights']['sha256'])} files match the manifest"


def _plan(art, s, opts: CheckOptions):
    plan = plan_slice(art.ranking, s, tp_size=opts.tp_size, channel_multiple=opts.channel_multiple)
    return plan, f"achieved sparsity {plan.achieved_sparsity:.4f}, {plan.kept_params:,} decoder parameters kept"


def _nested(plans):
    """Each slice keeps a subset of what every smaller sparsity keeps."""
    ordered = sorted(plans, key=lambda p: p.sparsity)
    for small, big in zip(ordered, ordered[1:]):
        for i, (a, b) in enumerate(zip(small.layers, big.layers)):
            for field in ("q_heads", "kv_heads", "channels"):
                if not set(getattr(b, field)) <= set(getattr(a, field)):
                    raise AssertionError(f"layer {i}: {field} at s={big.sparsity:g} not within s={small.sparsity:g}")
    return None, f"{len(ordered)} slice{'s' * (len(ordered) != 1)} nested"


def _dense(art):
    """The dense model through transformers, on the CPU in float32: the oracle's starting point."""
    t = time.perf_counter()
    model = load_model(art.weights_dir, torch.device("cpu"), torch.float32,
                       links_may_leave=not art.manifest["weights"]["copied"])
    return model, f"transformers loaded it in {time.perf_counter() - t:.2f} s"


def _tokenizer(path):
    tok = load_tokenizer(path)
    return tok, f"{type(tok).__name__}, {len(tok):,} tokens"


def _oracle(art, plan, oracle: OracleSlicer, model):
    """The oracle of what was loaded: the zeroed dense model, corrected as the slice says it was."""
    applied = (getattr(model.config, "gisp_refit", None) or {}).get("name")
    if not applied:
        return oracle.apply(plan)
    ids, mask = art.statistics()
    return corrected_oracle(oracle.restore(), plan, ids, mask, applied, model.config.gisp_refit["ridge"])


def _load(art, plan, refit="none"):
    t = time.perf_counter()
    model = load(art, plan=plan, refit=refit)
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


def _lm_eval(model, tok, tasks, limit):
    records = run_lm_eval(model, tok, tasks, limit=limit)
    return records, "; ".join(f"{r['task']} {r['metric']} {r['value']:.3f}"
                              + (f" ± {r['stderr']:.3f}" if r["stderr"] is not None else "") for r in records)


def _lm_eval_gate(records, task, minimum):
    acc = next((r for r in records if r["task"] == task and r["metric"] == "acc" and r["filter"] == "none"), None)
    if acc is None:
        raise AssertionError(f"lm-eval gave {task} no acc metric (it gave "
                             f"{', '.join(sorted({r['metric'] for r in records if r['task'] == task}))})")
    if acc["value"] < minimum:
        raise AssertionError(f"acc {acc['value']:.3f} ± {acc['stderr'] or 0:.3f} on {acc['items']} items is below "
                             f"{minimum:g}")
    return None, f"{acc['value']:.3f} ± {acc['stderr'] or 0:.3f} on {acc['items']} items"


def _same_as_vllm(model, prompts, served):
    if served is None:
        raise AssertionError("vLLM returned nothing for this slice")
    if "error" in served:
        raise AssertionError(f"vLLM could not run this slice: {served['error']}")
    want, gaps = greedy_reference(model, prompts, len(served["tokens"][0]))
    message = compare_greedy(served["tokens"], want, gaps)
    return None, f"{message} (vLLM engine up in {served['engine_s']:.1f} s)"


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


def write_report(checker: Checker, path: Path, artifact: str) -> None:
    """The JSON report: {"artifact", "ok", "results": [{"name", "ok", "message", "seconds"}, ...]}."""
    Path(path).write_text(json.dumps({"artifact": artifact, "ok": checker.ok,
                                      "results": [asdict(r) for r in checker.results]}, indent=2) + "\n")
