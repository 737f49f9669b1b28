"""`gisp-deploy serve`: a slice behind vLLM's OpenAI-compatible server, on loopback unless told otherwise."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import (console, expect_digest_option, fit_batch_size_option, fit_memory_option, fit_params_option,
                     fit_speedup_option, kv_cache_dtype_option, max_model_len_option, max_num_seqs_option,
                     refit_option, reserve_option, say, speed_table_option, verify_option)

SERVE_EXAMPLES = """
[bold]Examples[/]

  # the 40% slice on http://127.0.0.1:8000/v1 (model name llama3-gisp@0.4)
  gisp-deploy serve llama3-gisp --sparsity 0.4

  # two GPUs: widths rounded to split over 2 ranks, MLP to multiples of 128
  gisp-deploy serve llama3-gisp --sparsity 0.5 --tensor-parallel-size 2 \\
      --channel-multiple 128

  # the 40% slice with its load-time correction (exported to a temporary
  # directory first, then served: vLLM runs the corrected weights)
  gisp-deploy serve llama3-gisp --sparsity 0.4 --refit ec

  # an exported slice; anything after -- goes to vLLM unchanged
  gisp-deploy serve llama3-gisp-0.4/ --port 8001 -- \\
      --max-model-len 4096 --enable-prefix-caching

  # a model without a chat template answers 400 on /v1/chat/completions:
  # give it one (or use /v1/completions)
  gisp-deploy serve llama3-gisp --sparsity 0.4 -- \\
      --chat-template template.jinja

  # the largest slice for one 24 GiB GPU, 8k context for 4 requests;
  # vLLM gets the plan's --max-model-len, --max-num-seqs, --dtype and
  # the budget as --gpu-memory-utilization (CPU: --kv-cache-memory-bytes)
  gisp-deploy serve llama3-gisp --fit-memory 24GiB --max-model-len 8192 \\
      --max-num-seqs 4 -- --dtype bfloat16

  # the least pruned slice that decoded 1.5x faster than dense at batch 16
  # in this machine's `gisp-deploy bench --speed` run
  gisp-deploy serve llama3-gisp --fit-speedup 1.5 --fit-batch-size 16 \\
      --speed-table gisp-bench/results.json

  # then, from any OpenAI client
  curl http://127.0.0.1:8000/v1/completions \\
      -H 'Content-Type: application/json' \\
      -d '{"model": "llama3-gisp@0.4", "prompt": "Once upon a time",
           "max_tokens": 32}'
"""


def serve(
    ctx: typer.Context,
    artifact: Path = typer.Argument(..., help="Artifact directory (sliced while vLLM loads it), or a directory "
                                    "written by `gisp-deploy export`."),
    sparsity: Optional[float] = typer.Option(None, help="Sparsity of the slice to serve (artifacts only); or let a "
                                             "budget choose it (--fit-memory / --fit-params / --fit-speedup)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vLLM tensor-parallel ranks; "
                                             "per-layer widths are rounded to split over them."),
    channel_multiple: int = typer.Option(1, help="Round per-layer MLP widths up to a multiple of N."),
    served_model_name: Optional[str] = typer.Option(None, help="Model name clients ask for (default: "
                                                    "ARTIFACT-NAME@SPARSITY, or the export's directory name)."),
    vllm_args: Optional[List[str]] = typer.Argument(None, help="Further vLLM server arguments, after --."),
    verify: bool = verify_option(),
    expect_digest: Optional[str] = expect_digest_option(),
    fit_memory: Optional[str] = fit_memory_option(),
    fit_params: Optional[str] = fit_params_option(),
    fit_speedup: Optional[str] = fit_speedup_option(),
    fit_batch_size: int = fit_batch_size_option(),
    speed_table: Optional[Path] = speed_table_option(),
    max_model_len: Optional[int] = max_model_len_option(),
    max_num_seqs: int = max_num_seqs_option(),
    kv_cache_dtype: str = kv_cache_dtype_option(),
    reserve: str = reserve_option(),
    refit: str = refit_option(),
):
    """Serve one slice with vLLM's OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models).
    A budget (--fit-memory) chooses the slice and gives vLLM the settings it was planned for; --max-model-len,
    --max-num-seqs and --kv-cache-dtype go to vLLM, with or without a budget."""
    from ..arguments import check_one_size, check_served_refit
    from .common import check_budget

    check_one_size(sparsity, fit_memory, fit_params, fit_speedup)  # what a typo can break, before heavy imports
    check_served_refit(refit, sparsity, (fit_memory, fit_params, fit_speedup))
    budget = check_budget(artifact, fit_memory, fit_params, fit_speedup, speed_table, fit_batch_size, kv_cache_dtype,
                          reserve)
    max_num_seqs, reserve = (None if ctx.get_parameter_source(name).name == "DEFAULT" else value  # not given
                             for name, value in (("max_num_seqs", max_num_seqs), ("reserve", reserve)))
    kw = dict(host=host, port=port, tensor_parallel_size=tensor_parallel_size, channel_multiple=channel_multiple,
              served_model_name=served_model_name, vllm_args=vllm_args, verify=verify, expect_digest=expect_digest,
              max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype)
    _serve(artifact, sparsity, fit_memory=budget["memory"], fit_params=budget["params"],
           fit_speedup=budget["speedup"], speed_table=budget["speed_table"], fit_batch_size=fit_batch_size,
           reserve=reserve, on_plan=show_plan(artifact), refit=refit, **kw)


def _serve(artifact, sparsity, *, vllm_args, **kw) -> None:
    from ..deploy import serve as run

    rc = run(artifact, sparsity, vllm_args=vllm_args or (), log=say, **kw)
    if rc:
        console.print(f"[bold red]error:[/] the vLLM server exited with status {rc} (its log is above)")
        raise typer.Exit(rc if 0 < rc < 256 else 1)


def show_plan(artifact):
    """What `serve` prints of a budget's plan: fit's own lines and table (on stderr, with the server's log)."""
    def show(result):
        from rich.console import Console

        from .slices import candidates_table, fit_lines

        out = Console(stderr=True, width=None if sys.stderr.isatty() else 240)  # a log file: not cut to 80 columns
        for line in fit_lines(artifact, result):
            out.print(line, soft_wrap=True, highlight=False)
        out.print(candidates_table(result, out))
    return show
