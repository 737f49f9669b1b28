"""Checks of command-line values that need no torch: they run before any heavy import, so a typo answers at once."""

from __future__ import annotations

import math
from pathlib import Path

HUB_PREFIX = "hf://"  # `--calib hf://NAME`: a Hugging Face dataset; any other name is a local path
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}  # name -> torch's
DTYPE_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}  # torch's name -> bytes (a test checks torch agrees)


def dtype_bytes(name: str, default: int | None = None) -> int:
    """Bytes per element of a dtype given by name ("bfloat16", "float32", "fp16", ...)."""
    if name in DTYPE_NAMES:
        return DTYPE_ITEMSIZE[DTYPE_NAMES[name]]
    if default is None:
        raise ValueError(f"unknown dtype {name!r}; choose bfloat16, float16 or float32")
    return default


# prune --score: the Taylor terms a gradient method ranks by (pruning.scoring.taylor_importance)
SCORES = ("first", "second", "mix")
GRADIENT_METHODS = ("gisp", "oneshot")  # the methods --score applies to


def check_score(score: str, method: str = "gisp", objective: str = "lm") -> str:
    """A --score name that the method and objective can use (second order expands a loss: not the margin's)."""
    if score not in SCORES:
        raise ValueError(f"--score {score!r}: choose {', '.join(SCORES)}")
    if score != "first" and method not in GRADIENT_METHODS:
        raise ValueError(f"--score {score} applies to {' and '.join(GRADIENT_METHODS)}; method {method} has a "
                         "score of its own: drop --score")
    if score != "first" and objective == "margin":
        raise ValueError(f"--score {score} needs a loss to expand (--objective lm or answer); the margin objective "
                         "is a difference of two gradients: use --score first with it")
    return score


# prune --in-loop-refit: the correction GISP applies between its steps (pruning/refitting.py)
IN_LOOP_REFITS = ("none", "ls")


def check_in_loop_refit(name: str, method: str = "gisp") -> str:
    if name not in IN_LOOP_REFITS:
        raise ValueError(f"--in-loop-refit {name!r}: choose {', '.join(IN_LOOP_REFITS)}")
    if name != "none" and method not in GRADIENT_METHODS:
        raise ValueError(f"--in-loop-refit {name} refits between the steps of {' and '.join(GRADIENT_METHODS)}; "
                         f"method {method} takes no steps: drop --in-loop-refit (a slice of it can still be "
                         "loaded with --refit)")
    return name


class SparsityError(ValueError):
    pass


def parse_sparsities(text: str | float | list) -> list[float]:
    """'0,0.2,0.4' -> [0.0, 0.2, 0.4], refusing NaN, negative and >= 1 values."""
    if isinstance(text, (int, float)):
        items = [text]
    elif isinstance(text, str):
        items = text.replace(" ", "").split(",")
        if len(items) > 1 and "" in items:
            raise SparsityError(f"sparsities {text!r} have an empty item; separate values by single commas, "
                                "e.g. 0.2,0.4")
        items = [t for t in items if t]
    else:
        items = list(text)
    if not items:
        raise SparsityError("no sparsity given; pass e.g. --sparsities 0.2,0.4")
    out = []
    for item in items:
        try:
            s = float(item)
        except ValueError:
            raise SparsityError(f"sparsity {item!r} is not a number; pass fractions such as 0.4") from None
        if not math.isfinite(s) or s < 0 or s >= 1:
            raise SparsityError(f"sparsity {item!r} is out of range: it is a fraction of parameters in [0, 1), e.g. 0.4")
        out.append(s)
    return out


def parse_ints(text, flag: str, minimum: int = 1, example: str = "1,16") -> tuple[int, ...]:
    """'128,512' (or a sequence) -> (128, 512), each at least `minimum`."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        vals = tuple(int(x) for x in items if str(x).strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated integers, e.g. {example}") from None
    if not vals or min(vals) < minimum:
        raise ValueError(f"{flag} {text!r}: give integers >= {minimum}, e.g. {example}")
    return vals


def check_dtype(name: str | None, flag: str = "--dtype", auto: bool = True) -> str | None:
    if (auto and name in (None, "auto")) or name in DTYPE_NAMES:
        return name
    choices = "auto, float32, bfloat16 or float16" if auto else "float32, bfloat16 or float16"
    raise ValueError(f"{flag} {name!r}: choose {choices}")


def check_device(name: str) -> str:
    kind, _, index = str(name).partition(":")
    if name == "auto" or (kind in ("cpu", "cuda") and (not index or index.isdigit())):
        return name
    raise ValueError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")


def check_max_tokens(max_tokens: int | None, seq_lens) -> None:
    """--max-tokens N must leave at least one window of the longest context (0 or None: every token)."""
    if max_tokens and max_tokens < max(seq_lens):
        raise ValueError(f"--max-tokens {max_tokens} is shorter than one {max(seq_lens)}-token window; pass 0 "
                         f"(every token) or at least {max(seq_lens)}")


def require_local(paths, flag: str) -> None:
    """Every local path exists (`hf://NAME` is a hub dataset, checked when read)."""
    for p in paths:
        if not str(p).startswith(HUB_PREFIX) and not Path(p).exists():
            raise ValueError(f"{flag} {p}: no such file or directory (a Hugging Face dataset is named "
                             f"{HUB_PREFIX}NAME)")


# ---- budgets (`--fit-memory 24GiB`, `--fit-params 5B`): sizes and counts in the units people write
BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}  # B: billions, as in "a 7B model"
DEFAULT_RESERVE = "5%+512MiB"  # held back from a memory budget: see budget.Reserve
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's --kv-cache-dtype names of one-byte caches


def _number_and_unit(text, units: dict, flag: str, example: str) -> int:
    """'24GiB' -> 24 * 2**30 with `units` (lowercase suffix -> multiplier); a positive whole result."""
    raw = str(text).strip().replace("_", "")
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = raw[len(digits):].strip().lower()
    if raw.lower().endswith("e") or unit not in units:  # '1.5e' is a broken exponent, not a unit
        raise ValueError(f"{flag} {text!r}: unknown unit {unit!r}; write e.g. {example}")
    try:
        value = float(digits) * units[unit]
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a number with a unit; write e.g. {example}") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{flag} {text!r} must be positive and finite; write e.g. {example}")
    return int(value)


def parse_bytes(text, flag: str = "--fit-memory") -> int:
    """'24GiB', '24GB', '512MiB', '1.5e9', '4096' (bytes) -> bytes (GiB = 2**30, GB = 10**9)."""
    return _number_and_unit(text, BYTE_UNITS, flag, "24GiB, 24GB, 512MiB or a number of bytes")


def parse_count(text, flag: str = "--fit-params") -> int:
    """'5B', '500M', '1.2e9', '7000000' -> a parameter count (K, M, B, T: thousands to trillions)."""
    return _number_and_unit(text, COUNT_UNITS, flag, "5B, 500M or 1.2e9")


def parse_reserve(text) -> tuple[float, int]:
    """'5%+512MiB' -> (0.05, 536870912): memory held back, a share of the budget plus a fixed size ('0': none)."""
    fraction, fixed = 0.0, 0
    for part in str(text).replace(" ", "").split("+"):
        if part.endswith("%"):
            try:
                share = float(part[:-1]) / 100
            except ValueError:
                share = -1.0
            if not 0 <= share < 1:
                raise ValueError(f"--reserve {text!r}: a share is a percentage in [0, 100), e.g. 5%+512MiB")
            fraction += share
        elif part.strip("0.") or not part:  # '0' (or '0.0') alone means nothing held back
            fixed += parse_bytes(part, "--reserve")
    return fraction, fixed


def check_kv_cache_dtype(name: str | None) -> str | None:
    if name in (None, "auto") or name in FP8_KV_CACHE_DTYPES or name in DTYPE_NAMES:
        return name
    raise ValueError(f"--kv-cache-dtype {name!r}: choose auto (the weights' dtype), float32, bfloat16, float16, "
                     f"{', '.join(FP8_KV_CACHE_DTYPES)}")


def parse_speedup(text, flag: str = "--fit-speedup") -> float:
    """'1.5' or '1.5x' -> 1.5: a decode speed-up over the dense model (1 or less: the dense model meets it)."""
    raw = str(text).strip().lower().removesuffix("x")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{flag} {text!r}: give a speed-up over the dense model, a positive number, e.g. 1.5")
    return value


def check_one_size(sparsity, *budgets) -> None:
    """A slice is chosen by a sparsity or by a budget (--fit-memory / --fit-params / --fit-speedup), never both."""
    if sparsity is not None and any(b is not None for b in budgets):
        raise ValueError("a sparsity and a budget together: drop --sparsity to let --fit-memory / --fit-params / "
                         "--fit-speedup choose the slice, or drop the budget")


# Load-time corrections of a slice (`--refit`): gisp_deploy/refit.py has the math, slicing/correction.py runs it.
REFITS = {"none": "the plain slice: dense weights with structures cut out",
          "ls": "least squares from the dense model's o_proj / down_proj input moments",
          "ec": "error-correcting: layer by layer, the dense output regressed on the corrected slice's inputs",
          "ecr": "ec whose target also holds the residual stream's dense-minus-slice gap (undoes upstream error)"}


def check_refit(name: str | None, flag: str = "--refit") -> str:
    if name is None:
        return "none"
    if name not in REFITS:
        raise ValueError(f"{flag} {name!r}: choose {', '.join(REFITS)} (see --help)")
    return name


def check_served_refit(name: str | None, sparsity, budgets=()) -> str:
    """`serve --refit` corrects one slice, exported first: it takes a sparsity, never a budget."""
    name = check_refit(name)
    budget = any(b is not None for b in budgets)
    if name != "none" and (sparsity is None or budget):
        raise ValueError(f"--refit corrects one slice of an artifact: pass --sparsity{' instead of a budget' * budget} "
                         "(`gisp-deploy fit` prints the sparsity a budget chooses; an export is served as written)")
    return name
