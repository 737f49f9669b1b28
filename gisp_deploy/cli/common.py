"""What every subcommand shares: the error line, progress bars, and the options several commands take."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

console = Console(stderr=True)
EXPECTED_ERRORS = (ValueError, OSError, KeyError)


def friendly(fn):
    """Turn the library's validation errors into one red line and exit status 2, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except EXPECTED_ERRORS as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
    return wrapper


def progress_bar(transient: bool = False, on: Console = console) -> Progress:
    """One line per pass (add them with pass_reporter): the description, the bar, done/total and its unit,
    times. The bar takes the width the rest leaves (as tqdm's does): on a narrow terminal it gives way first."""
    def whole():
        return Column(no_wrap=True)
    return Progress(TextColumn("{task.description}", table_column=whole()),
                    BarColumn(bar_width=None, table_column=Column(ratio=1)), MofNCompleteColumn(table_column=whole()),
                    TextColumn("{task.fields[unit]}", table_column=whole()), TimeElapsedColumn(table_column=whole()),
                    TimeRemainingColumn(table_column=whole()), console=on, transient=transient, expand=True)


def pass_reporter(progress: Progress, keep: bool = True):
    """The library's progress callback (quality.tasks.Progress; prune's on_pass): a bar per pass. keep=False
    drops a bar once its pass is done, so a long run shows only the passes under way."""
    def on_pass(description: str, total: int, unit: str = "tokens"):
        task = progress.add_task(description, total=total, unit=unit)
        left = total

        def advance(n: int) -> None:
            nonlocal left
            progress.advance(task, n)
            left -= n
            if not keep and left <= 0 < left + n:  # the advance that finished the pass
                progress.remove_task(task)
        return advance
    return on_pass


def say(message: str) -> None:
    """A plain line from the library on stderr (no rich markup read into it)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def text_option() -> List[Path]:
    return typer.Option([], "--text", help="Held-out text (.txt/.txt.gz) for perplexity; repeat for several.")


def task_option() -> List[Path]:
    return typer.Option([], "--task", help="Multiple-choice JSONL ({prompt, choices, answer}) for accuracy; repeat "
                        "for several.")


def verify_option() -> bool:
    return typer.Option(True, "--verify/--no-verify", help="Check every file of the artifact against the sha256 its "
                        "manifest records before use (a file verified on this machine and unchanged since is not "
                        "read again); --no-verify skips the check.")


def expect_digest_option():
    return typer.Option(None, help="Refuse the artifact unless its manifest has this sha256 (as `gisp-deploy "
                        "check` prints it): deploy exactly what CI checked.")


def alias_option(name: str):
    """The former name of an option, still accepted (hidden from --help): one name per concept across commands."""
    return typer.Option(None, name, hidden=True)


def max_tokens_option() -> int:
    return typer.Option(65536, help="Use the first N tokens of each text (0: all).")


def batch_size_option() -> int:
    return typer.Option(16, help="Windows per forward pass when measuring quality.")


def device_option() -> str:
    return typer.Option("auto", help="Device the slices are measured on: auto | cpu | cuda.")


def dtype_option() -> str:
    return typer.Option("float32", help="dtype the slices are measured in: float32 | bfloat16 | float16.")


def tp_size_option() -> int:
    return typer.Option(1, help="Round per-layer widths so they split over this tensor-parallel size.")


def channel_multiple_option() -> int:
    return typer.Option(1, help="Round per-layer MLP widths to a multiple of N (e.g. 64, 128).")


def fit_memory_option():
    return typer.Option(None, "--fit-memory", help="Memory of each GPU: 24GiB, 24GB, 512MiB or bytes. Weights + KV "
                        "cache + --reserve must fit in it.")


def fit_params_option():
    return typer.Option(None, "--fit-params", help="Parameters of the served model, embeddings included: 5B, 500M, "
                        "1.2e9.")


def max_model_len_option():
    return typer.Option(None, "--max-model-len", min=1, help="With --fit-memory: tokens of context the KV cache "
                        "holds per sequence (default: the model's max_position_embeddings).")


def max_num_seqs_option() -> int:
    return typer.Option(1, "--max-num-seqs", min=1, help="With --fit-memory: sequences of --max-model-len tokens "
                        "the KV cache holds at once.")


def kv_cache_dtype_option() -> str:
    return typer.Option("auto", "--kv-cache-dtype", help="With --fit-memory: the KV cache's dtype, as vLLM's "
                        "option: auto (the weights') | bfloat16 | float16 | float32 | fp8.")


def reserve_option() -> str:
    from ..arguments import DEFAULT_RESERVE

    return typer.Option(DEFAULT_RESERVE, help="Memory held back from --fit-memory for the runtime: a share of it "
                        "plus a fixed size (CUDA context, activations, CUDA graphs); 0 for none.")


def lm_eval_tasks_option() -> str:
    return typer.Option("", "--lm-eval-tasks", help="Comma-separated lm-eval tasks run on each slice through "
                        "lm-eval's own HF wrapper: names in lm-eval's index (hellaswag,arc_easy: their data comes "
                        "from the Hugging Face Hub or its cache) or paths to local task YAML files "
                        "(examples/lm-eval/). Needs gisp-deploy\\[lm-eval].")


def lm_eval_limit_option() -> int:
    return typer.Option(0, help="Only the first N items of each lm-eval task (0: all); quick looks, not numbers to "
                        "publish.")


def num_fewshot_option():
    return typer.Option(None, help="Few-shot examples per lm-eval item (default: each task's own, usually 0).")


def refit_option() -> str:
    return typer.Option("none", "--refit", help="Load-time correction of each slice from the artifact's calibration "
                        "windows: none (the plain slice) | ls (least squares of o_proj / down_proj from the dense "
                        "model's input moments) | ec (error-correcting: layer by layer, the dense output regressed "
                        "on the corrected slice's inputs). Artifacts without windows load plain, with a notice.")
