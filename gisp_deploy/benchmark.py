"""`gisp-deploy bench`: quality, size, load time and (with vLLM) decode speed of every slice, side by side.

One record per (artifact, sparsity); the dense model (sparsity 0) is always included and, for artifacts made
from the same weights, measured once. Speed-ups are against that dense model; the ideal speed-up is the
ratio of bytes a decode step reads (weights, all but the embedding table, plus the KV cache of the batch at
the run's mean context), which bounds a memory-bound decoder's gain.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .artifact import load_artifact
from .data import token_stream
from .evaluate import perplexity
from .loader import load
from .plan import plan_slice
from .prune_run import load_tokenizer
from .serve import DTYPE_BYTES, slice_summary
from .speed import SpeedConfig, measure
from .tasks import task_accuracy


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

    def __post_init__(self):
        if 0.0 not in self.sparsities:
            object.__setattr__(self, "sparsities", (0.0, *self.sparsities))
        object.__setattr__(self, "sparsities", tuple(sorted(set(self.sparsities))))
        if not self.seq_lens or min(self.seq_lens) < 2:
            raise ValueError(f"--seq-lens {self.seq_lens}: give context lengths >= 2, e.g. 128,512")
        if self.serve_dtype not in DTYPE_BYTES:
            raise ValueError(f"--serve-dtype {self.serve_dtype!r}: choose bfloat16, float16 or float32")
        if self.speed and self.speed.dtype != self.serve_dtype:  # bytes are counted at the dtype vLLM runs
            object.__setattr__(self, "speed", replace(self.speed, dtype=self.serve_dtype))


def decode_bytes(weight_read_params: int, kv_bytes_per_token: int, dtype_bytes: int, batch: int,
                 context: float) -> float:
    """Bytes one decode step reads: every weight once, and each sequence's KV cache."""
    return weight_read_params * dtype_bytes + batch * context * kv_bytes_per_token


def weight_read_params(parameters: int, config) -> int:
    """Parameters a decode step reads: all but the input embedding table (one row per token), unless tied to
    the output projection, which reads it whole."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "tie_word_embeddings", False):
        return parameters
    return parameters - text.vocab_size * text.hidden_size


def _weights_key(art) -> tuple:
    return tuple(sorted(art.manifest.get("weights", {}).get("sha256", {}).items())) or (str(art.weights_dir),)


class Bench:
    """Measures artifacts slice by slice; `on_record` sees each record as soon as it is complete."""

    def __init__(self, cfg: BenchConfig, *, on_record=None, progress=None, log=print):
        self.cfg, self.on_record, self.progress, self.log = cfg, on_record, progress, log
        self.records: list[dict] = []
        self._dense: dict[tuple, dict] = {}

    def validate(self, paths) -> list:
        """Load every artifact and plan every slice before measuring anything, so bad input fails at once."""
        arts = [load_artifact(p) for p in paths]
        for art in arts:
            for s in self.cfg.sparsities:
                plan_slice(art.ranking, s, tp_size=self.cfg.tp_size, channel_multiple=self.cfg.channel_multiple)
            limit = getattr(art.config.get_text_config(decoder=True), "max_position_embeddings", None)
            if self.cfg.texts and limit and max(self.cfg.seq_lens) > limit:
                raise ValueError(f"{art.path}: --seq-lens {max(self.cfg.seq_lens)} exceeds the model's "
                                 f"max_position_embeddings ({limit}); use shorter contexts")
            if self.cfg.texts or self.cfg.tasks:
                load_tokenizer(art.path)  # names the missing files and the fix
        return arts

    def run(self, paths) -> list[dict]:
        for art in self.validate(paths):
            self._run_artifact(art)
        return self.records

    def _run_artifact(self, art):
        cfg = self.cfg
        streams, tok = {}, None
        if cfg.texts or cfg.tasks:
            tok = load_tokenizer(art.path)
            for t in cfg.texts:
                stream = token_stream(tok, [t])
                streams[Path(t).name] = stream[:cfg.max_tokens] if cfg.max_tokens else stream
        key = _weights_key(art)
        dense = None
        for s in cfg.sparsities:
            plan = plan_slice(art.ranking, s, tp_size=cfg.tp_size, channel_multiple=cfg.channel_multiple)
            summary = slice_summary(art.path, s, tp_size=cfg.tp_size, channel_multiple=cfg.channel_multiple,
                                    dtype=cfg.serve_dtype)
            nbytes = DTYPE_BYTES[cfg.serve_dtype]
            rec = {"artifact": str(art.path), "name": Path(art.path).name, "method": art.manifest.get("method"),
                   "unit": plan.unit, "sparsity": s, "achieved_sparsity": plan.achieved_sparsity,
                   "decoder_params": plan.kept_params, "dense_decoder_params": plan.shape.total_params,
                   "parameters": summary.parameters, "padding_parameters": summary.padding_parameters,
                   "weight_bytes": summary.parameters * nbytes, "serve_dtype": cfg.serve_dtype,
                   "kv_bytes_per_token": summary.kv_bytes_per_token,
                   "weight_read_params": weight_read_params(summary.parameters, art.config)}
            shared = self._dense.get(key) if s == 0 else None
            if shared:
                rec.update({k: shared[k] for k in ("load_s", "perplexity", "tasks", "speed")},
                           measured_with=shared["name"])
            else:
                self.log(f"{rec['name']} at sparsity {s:g}: loading and measuring")
                rec.update(self._quality(art, plan, streams, tok))
                rec["speed"] = self._speed(art, s) if cfg.speed else None
            if s == 0:
                dense = rec
                self._dense.setdefault(key, rec)
            if rec["speed"]:
                rec["speed"] = self._with_ideal(rec, dense)
            self.records.append(rec)
            if self.on_record:
                self.on_record(rec)

    def _quality(self, art, plan, streams, tok) -> dict:
        cfg = self.cfg
        t = time.perf_counter()
        model = load(art, plan=plan, device=cfg.device, dtype=cfg.dtype)
        if str(cfg.device).startswith("cuda"):
            torch.cuda.synchronize()
        out = {"load_s": time.perf_counter() - t, "perplexity": [], "tasks": []}
        for name, stream in streams.items():
            for L in cfg.seq_lens:
                ppl, count = perplexity(model, stream, L, cfg.batch_size, self.progress)
                out["perplexity"].append({"text": name, "seq_len": L, "perplexity": ppl, "tokens": count})
        for task in cfg.tasks:
            r = task_accuracy(model, tok, task, batch_size=cfg.batch_size)
            out["tasks"].append({k: r[k] for k in ("task", "items", "accuracy", "accuracy_norm")})
        del model
        gc.collect()
        return out

    def _speed(self, art, s: float) -> dict:
        speed = self.cfg.speed
        self.log(f"  vLLM speed at batch sizes {', '.join(map(str, speed.batch_sizes))} "
                 f"({speed.prompt_len}-token prompts, {speed.gen_len} new tokens)")
        return measure(art, None if s == 0 else s, speed)

    def _with_ideal(self, rec: dict, dense: dict) -> dict:
        """Speed-up over the dense model per batch size, the ideal one, and the fraction achieved."""
        cfg, nbytes = self.cfg.speed, DTYPE_BYTES[self.cfg.serve_dtype]
        base = {r["batch_size"]: r for r in dense["speed"]["results"]}
        rows = []
        for r in rec["speed"]["results"]:
            b = r["batch_size"]
            ideal = decode_bytes(dense["weight_read_params"], dense["kv_bytes_per_token"], nbytes, b, cfg.context) / \
                decode_bytes(rec["weight_read_params"], rec["kv_bytes_per_token"], nbytes, b, cfg.context)
            speedup = base[b]["tpot_s"] / r["tpot_s"]
            rows.append({**r, "speedup": speedup, "throughput_speedup":
                         r["output_tokens_per_s"] / base[b]["output_tokens_per_s"], "ideal_speedup": ideal,
                         "fraction_of_ideal": speedup / ideal,
                         "gain_fraction": (speedup - 1) / (ideal - 1) if ideal > 1 + 1e-9 else None})
        return {**rec["speed"], "results": rows}
