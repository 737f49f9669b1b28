"""`gisp-deploy bench`: quality, size, load time and (with vLLM) decode speed of every slice, side by side.

One flat record per measurement (README, "Measurement records"): per slice a size record (with its load time),
perplexity, accuracy and lm-eval records, and with vLLM a speed record per batch size. The dense model (sparsity 0) is
always included and, for artifacts made from the same weights, measured once. Speed-ups are against that dense model; the ideal speed-up is the
ratio of bytes a decode step reads (weights, all but the embedding table, plus the KV cache of the batch at
the run's mean context), which bounds a memory-bound decoder's gain.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..arguments import dtype_bytes, parse_ints, parse_sparsities
from ..artifact import load_artifact
from ..budget import budget_plan, decode_bytes, weight_read_params
from ..hf import load_tokenizer
from ..plan import plan_slice
from ..quality.evaluate import measure_quality, slice_identity, text_streams
from ..quality.lm_eval import check_options, prepare_tasks, split_tasks
from ..serving.summary import slice_summary
from ..slicing.loader import load
from .speed import Engine, SpeedConfig, ideal_warning, measure


@dataclass(frozen=True)
class BenchConfig:
    sparsities: tuple[float, ...]
    texts: tuple[str, ...] = ()
    seq_lens: tuple[int, ...] = (128, 512)
    tasks: tuple[str, ...] = ()
    max_tokens: int | None = 65536
    batch_size: int = 16
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # of the quality measurements
    serve_dtype: str = "bfloat16"  # bytes are counted at it; vLLM runs with it
    tp_size: int = 1
    channel_multiple: int = 1
    speed: SpeedConfig | None = None
    verify: bool = True  # every file against the manifest before use (once per machine: integrity.py)
    lm_eval_tasks: tuple[str, ...] = ()  # lm-eval task names / YAML paths
    lm_eval_limit: int | None = None
    num_fewshot: int | None = None
    lm_eval_include_path: str | None = None
    budget: dict | None = None  # budget.budget_plan's keywords: each artifact's slice instead of `sparsities`
    refit: str = "none"  # load-time correction of every slice (load(..., refit=)); --speed runs the same shapes

    def __post_init__(self):
        if 0.0 not in self.sparsities:
            object.__setattr__(self, "sparsities", (0.0, *self.sparsities))
        object.__setattr__(self, "sparsities", tuple(sorted(set(self.sparsities))))
        if not self.seq_lens or min(self.seq_lens) < 2:
            raise ValueError(f"--seq-lens {self.seq_lens}: give context lengths >= 2, e.g. 128,512")
        try:
            dtype_bytes(self.serve_dtype)
        except ValueError:
            raise ValueError(f"--serve-dtype {self.serve_dtype!r}: choose bfloat16, float16 or float32") from None
        if self.speed and self.speed.dtype != self.serve_dtype:  # bytes are counted at the dtype vLLM runs
            object.__setattr__(self, "speed", replace(self.speed, dtype=self.serve_dtype))
        check_options(self.lm_eval_limit, self.num_fewshot)


def _weights_key(art) -> tuple:
    return tuple(sorted(art.manifest.get("weights", {}).get("sha256", {}).items())) or (str(art.weights_dir),)


class Bench:
    """Measures artifacts slice by slice; `on_record` sees each record as soon as it is complete; `progress`
    (quality.tasks.Progress) each quality pass ("art-gisp s=0.4 persuasion.txt.gz", with its total)."""

    def __init__(self, cfg: BenchConfig, *, on_record=None, progress=None, log=print):
        self.cfg, self.on_record, self.progress, self.log = cfg, on_record, progress, log
        self.records: list[dict] = []
        self._dense: dict[tuple, dict] = {}
        self._dense_engine: tuple[tuple, Engine] | None = None  # (weights key, engine), kept for the slices
        self._lm_eval = None  # the lm-eval tasks, resolved and their data read once (validate)
        self._budget_slices: dict[str, float] = {}  # artifact path -> the sparsity its budget chose (validate)
        self.digests: dict[str, str] = {}  # artifact path -> its manifest's sha256 (what a --speed-table checks)

    def validate(self, paths) -> list:
        """Resolve the lm-eval tasks, load every artifact and plan every slice before measuring anything, so bad
        input fails at once."""
        if self.cfg.lm_eval_tasks:
            self._lm_eval = prepare_tasks(self.cfg.lm_eval_tasks, include_path=self.cfg.lm_eval_include_path)
        arts = [load_artifact(p, verify=self.cfg.verify) for p in paths]
        for art in arts:
            if self.cfg.budget:
                self._budget_slices[str(art.path)] = budget_plan(
                    art, None, **self.cfg.budget, dtype=self.cfg.serve_dtype, tp_size=self.cfg.tp_size,
                    channel_multiple=self.cfg.channel_multiple).sparsity
                self.log(f"{art.path}: the budget chooses sparsity {self._budget_slices[str(art.path)]:g}")
            for s in self.sparsities(art):
                plan_slice(art.ranking, s, tp_size=self.cfg.tp_size, channel_multiple=self.cfg.channel_multiple)
            limit = getattr(art.config.get_text_config(decoder=True), "max_position_embeddings", None)
            if self.cfg.texts and limit and max(self.cfg.seq_lens) > limit:
                raise ValueError(f"{art.path}: --seq-lens {max(self.cfg.seq_lens)} exceeds the model's "
                                 f"max_position_embeddings ({limit}); use shorter contexts")
            if self.cfg.texts or self.cfg.tasks or self.cfg.lm_eval_tasks:
                load_tokenizer(art.path)  # names the missing files and the fix
        return arts

    def sparsities(self, art) -> tuple[float, ...]:
        """The slices of `art` to measure: the dense model and the budget's slice, or every configured sparsity."""
        chosen = self._budget_slices.get(str(art.path))
        return self.cfg.sparsities if chosen is None else tuple(sorted({0.0, chosen}))

    def run(self, paths) -> list[dict]:
        try:
            for art in self.validate(paths):
                self._run_artifact(art)
        finally:
            if self._dense_engine:
                self._dense_engine[1].close()
        return self.records

    def _run_artifact(self, art):
        cfg = self.cfg
        self.digests[str(art.path)] = art.digest
        tok = load_tokenizer(art.path) if cfg.texts or cfg.tasks or cfg.lm_eval_tasks else None
        streams = text_streams(tok, cfg.texts, cfg.max_tokens) if tok is not None else {}
        key = _weights_key(art)
        dense = []
        for s in self.sparsities(art):
            plan = plan_slice(art.ranking, s, tp_size=cfg.tp_size, channel_multiple=cfg.channel_multiple)
            ident = slice_identity(art, plan)
            shared = self._dense.get(key) if s == 0 else None
            if shared:  # the same dense weights were measured for an earlier artifact
                recs = [{**r, **ident, "measured_with": shared[0]["name"]} for r in shared]
            else:
                self.log(f"{ident['name']} at sparsity {s:g}: loading and measuring")
                recs = self._measure(art, plan, ident, streams, tok)
            if s == 0:
                dense = recs
                self._dense.setdefault(key, recs)
            recs = _with_ideal(recs, dense, cfg, self.log)
            self.records += recs
            if self.on_record:
                self.on_record(recs)

    def _measure(self, art, plan, ident: dict, streams: dict, tok) -> list[dict]:
        """The slice's size record (with its load time), its quality records and (with speed) its speed records."""
        cfg = self.cfg
        summary = slice_summary(art.path, plan.sparsity, tp_size=cfg.tp_size, channel_multiple=cfg.channel_multiple,
                                dtype=cfg.serve_dtype, verify=False)  # `art` was verified when loaded
        t = time.perf_counter()
        refit = cfg.refit if plan.sparsity else "none"  # the dense model needs no correction
        model = load(art, plan=plan, device=cfg.device, dtype=cfg.dtype, refit=refit)
        if str(cfg.device).startswith("cuda"):
            torch.cuda.synchronize()
        size = {**ident, "measure": "size", "load_s": time.perf_counter() - t,
                "refit": (getattr(model.config, "gisp_refit", None) or {}).get("name", "none"),
                "decoder_params": plan.kept_params,
                "dense_decoder_params": plan.shape.total_params, "parameters": summary.parameters,
                "padding_parameters": summary.padding_parameters,
                "weight_bytes": summary.parameters * dtype_bytes(cfg.serve_dtype), "serve_dtype": cfg.serve_dtype,
                "kv_bytes_per_token": summary.kv_bytes_per_token,
                "weight_read_params": weight_read_params(summary.parameters, art.config)}
        quality = measure_quality(model, tok, streams, cfg.seq_lens, cfg.tasks, batch_size=cfg.batch_size,
                                  progress=self.progress, label=f"{ident['name']} s={plan.sparsity:g}", lm_eval_tasks=self._lm_eval,
                                  lm_eval_limit=cfg.lm_eval_limit, num_fewshot=cfg.num_fewshot)
        del model
        gc.collect()
        return [size, *({**ident, **r} for r in quality), *self._speed(art, plan.sparsity, ident)]

    def _dense_engine_for(self, art) -> Engine:
        """The dense model's engine of `art`'s weights: started once, kept alive while its slices are timed."""
        key = _weights_key(art)
        if self._dense_engine and self._dense_engine[0] != key:
            self._dense_engine[1].close()
            self._dense_engine = None
        if not self._dense_engine:
            self.log("  starting vLLM on the dense model")
            self._dense_engine = (key, Engine(art, None, self.cfg.speed))
        return self._dense_engine[1]

    def _speed(self, art, s: float, ident: dict) -> list[dict]:
        """Speed records per batch size; a slice is timed in turns with the dense model, both engines alive."""
        speed = self.cfg.speed
        if speed is None:
            return []
        dense = self._dense_engine_for(art)
        self.log(f"  vLLM speed at batch sizes {', '.join(map(str, speed.batch_sizes))} "
                 f"({speed.prompt_len}-token prompts, {speed.gen_len} new tokens)"
                 + ("" if s == 0 else ", in turns with the dense model"))
        other = None if s == 0 else Engine(art, s, speed)
        try:
            rows = [measure(dense, other, speed, b) for b in speed.batch_sizes]
        finally:
            if other:
                other.close()
        common = {"prompt_len": speed.prompt_len, "gen_len": speed.gen_len, "dtype": speed.dtype,
                  "startup_s": (other or dense).startup_s}
        return [{**ident, "measure": "speed", **common, **row} for row in rows]


def _with_ideal(recs: list[dict], dense: list[dict], cfg: BenchConfig, log=print) -> list[dict]:
    """Speed records with the ideal speed-up (the ratio of bytes a decode step reads), the fraction of it the
    measured speed-up achieved, and a warning (also logged) for every speed-up that is not a fact."""
    size = next(r for r in recs if r["measure"] == "size")
    dense_size = next(r for r in dense if r["measure"] == "size")
    nbytes = dtype_bytes(cfg.serve_dtype)
    out = []
    for r in recs:
        if r["measure"] == "speed":
            b, context = r["batch_size"], cfg.speed.context
            ideal = decode_bytes(dense_size["weight_read_params"] * nbytes, dense_size["kv_bytes_per_token"], b,
                                 context) / \
                decode_bytes(size["weight_read_params"] * nbytes, size["kv_bytes_per_token"], b, context)
            beaten = ideal_warning(r, ideal, cfg.speed)
            r = {**r, "ideal_speedup": ideal, "fraction_of_ideal": r["speedup"] / ideal,
                 "gain_fraction": (r["speedup"] - 1) / (ideal - 1) if ideal > 1 + 1e-9 else None,
                 "warnings": [*r["warnings"], *([beaten] if beaten else [])]}
            for w in r["warnings"]:
                log(f"warning: {r['name']} at sparsity {r['sparsity']:g}, batch {b}: {w}")
        out.append(r)
    return out


def _budget_record(budget: dict | None) -> dict | None:
    """The budget as results.json records it (a speed table by its path)."""
    if not budget:
        return None
    options = {k: getattr(v, "path", v) for k, v in budget["fit_options"].items()}
    return {**{k: v for k, v in budget.items() if k != "fit_options"}, **options}


def _floats(text: str, what: str) -> list[float]:
    try:
        return parse_sparsities(text)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


DEFAULT_SPARSITIES = "0.2,0.3,0.4,0.5"


def bench(artifacts, *, sparsities=None, texts=(), tasks=(), seq_lens="128,512",
          max_tokens: int = 65536, batch_size: int = 16, device: str = "auto", dtype: str = "float32",
          serve_dtype: str = "bfloat16", tp_size: int = 1, channel_multiple: int = 1, speed: bool = False,
          batch_sizes="1,16", prompt_len: int = 128, gen_len: int = 64, repeats: int = 3, tolerance: float = 0.10,
          until_stable: bool = False, max_repeats: int = 12, eager: bool = False, out="gisp-bench", plots: bool = True,
          command: str = "bench", verify: bool = True, progress=None, log=print, lm_eval_tasks=(),
          lm_eval_limit: int | None = None, num_fewshot: int | None = None, lm_eval_include_path=None,
          fit_memory=None, fit_params=None, fit_speedup=None, fit_options: dict | None = None, refit: str = "none"):
    """`gisp-deploy bench` from Python: measure every slice of `artifacts`, write OUT/results.json, report.md
    and plots (results.json and report.md after every record, so an interruption keeps what was measured).
    Returns (records, paths written). Sparsities, seq_lens, batch_sizes and lm_eval_tasks (lm-eval task names
    or task YAML paths): comma-separated or sequences; lm_eval_limit: the first N items of each lm-eval task.
    progress(description, total, unit) -> advance(n) is told of each perplexity and accuracy pass before it
    starts (one per slice and text, in tokens, and per slice and task, in items). A budget (fit_memory /
    fit_params / fit_speedup, with fit_options: budget.fit's other keywords) instead of sparsities measures the
    slice it chooses in each artifact, next to the dense model. refit: every slice loaded with that load-time
    correction (load(..., refit=)); size records say which was applied."""
    from ..arguments import check_one_size
    from ..hf import pick_device, pick_dtype

    check_one_size(sparsities, fit_memory, fit_params, fit_speedup)
    given = {k: v for k, v in (("fit_memory", fit_memory), ("fit_params", fit_params), ("fit_speedup", fit_speedup))
             if v is not None}
    budget = {**given, "fit_options": fit_options or {}} if given else None
    from .report import environment, write_markdown, write_plots, write_results

    for p in [*texts, *tasks]:
        if not Path(p).is_file():
            raise ValueError(f"{p}: no such file")
    speed_cfg = None
    if speed:
        from ..serving.process import require_vllm

        require_vllm()
        speed_cfg = SpeedConfig(batch_sizes=parse_ints(batch_sizes, "--batch-sizes"), prompt_len=prompt_len,
                                gen_len=gen_len, repeats=repeats, dtype=serve_dtype, tp_size=tp_size,
                                channel_multiple=channel_multiple, enforce_eager=eager, tolerance=tolerance,
                                until_stable=until_stable, max_repeats=max_repeats)
    dev = pick_device(device)
    listed = () if budget else tuple(_floats(sparsities or DEFAULT_SPARSITIES, "--sparsities"))
    cfg = BenchConfig(sparsities=listed, texts=tuple(map(str, texts)),
                      seq_lens=parse_ints(seq_lens, "--seq-lens", minimum=2, example="128,512"), tasks=tuple(map(str, tasks)),
                      max_tokens=max_tokens or None, batch_size=batch_size, device=str(dev),
                      dtype=pick_dtype(dtype, dev), serve_dtype=serve_dtype, tp_size=tp_size,
                      channel_multiple=channel_multiple, speed=speed_cfg, verify=verify,
                      lm_eval_tasks=tuple(split_tasks(lm_eval_tasks)), lm_eval_limit=lm_eval_limit or None,
                      num_fewshot=num_fewshot,
                      lm_eval_include_path=str(lm_eval_include_path) if lm_eval_include_path else None,
                      budget=budget, refit=refit)
    meta = {"command": command, "environment": environment(), "device": str(dev), "quality_dtype": dtype,
            "serve_dtype": serve_dtype, "sparsities": list(cfg.sparsities),
            "speed": speed_cfg.__dict__ if speed_cfg else None, "budget": _budget_record(budget)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def on_record(_rec):
        meta["artifact_digests"] = runner.digests
        write_results(out, runner.records, meta)  # what is measured so far survives an interruption
        write_markdown(out, runner.records, meta)

    runner = Bench(cfg, on_record=on_record, progress=progress, log=log)
    records = runner.run(artifacts)
    if not records:
        return records, []
    written = [write_results(out, records, meta), write_markdown(out, records, meta)]
    if plots:
        written += write_plots(out, records)
    return records, written
