"""`gisp-deploy serve`: a slice behind vLLM's OpenAI-compatible server, on loopback unless told otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import console, expect_digest_option, refit_option, say, verify_option

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

  # then, from any OpenAI client
  curl http://127.0.0.1:8000/v1/completions \\
      -H 'Content-Type: application/json' \\
      -d '{"model": "llama3-gisp@0.4", "prompt": "Once upon a time",
           "max_tokens": 32}'
"""


def serve(
    artifact: Path = typer.Argument(..., help="Artifact directory (sliced while vLLM loads it), or a directory "
                                    "written by `gisp-deploy export`."),
    sparsity: Optional[float] = typer.Option(None, help="Sparsity of the slice to serve (artifacts only)."),
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
    refit: str = refit_option(),
):
    """Serve one slice with vLLM's OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models)."""
    from ..arguments import check_refit

    if check_refit(refit) != "none":
        if sparsity is None:
            raise ValueError("--refit corrects a slice of an artifact: pass --sparsity too (an export is served as "
                             "it was written)")
        return _serve_corrected(artifact, sparsity, refit, host=host, port=port,
                                tensor_parallel_size=tensor_parallel_size, channel_multiple=channel_multiple,
                                served_model_name=served_model_name, vllm_args=vllm_args, verify=verify,
                                expect_digest=expect_digest)
    _serve(artifact, sparsity, host=host, port=port, tensor_parallel_size=tensor_parallel_size,
           channel_multiple=channel_multiple, served_model_name=served_model_name, vllm_args=vllm_args,
           verify=verify, expect_digest=expect_digest)


def _serve_corrected(artifact: Path, sparsity: float, refit: str, *, served_model_name, **kw) -> None:
    """The corrected slice exported (gisp_deploy.export(..., refit=)) to a temporary directory, then served."""
    import tempfile

    from ..slicing.export import export_slice

    with tempfile.TemporaryDirectory(prefix="gisp-refit-") as tmp:
        out = Path(tmp) / f"{Path(artifact).name}-{sparsity:g}-{refit}"
        export_slice(artifact, out, sparsity, tp_size=kw["tensor_parallel_size"], refit=refit,
                     channel_multiple=kw["channel_multiple"], verify=kw["verify"], expect_digest=kw["expect_digest"])
        say(f"corrected slice ({refit}) exported to {out} for serving")
        _serve(out, None, served_model_name=served_model_name or f"{Path(artifact).name}@{sparsity:g}+{refit}",
               **{**kw, "expect_digest": None})


def _serve(artifact, sparsity, *, vllm_args, **kw) -> None:
    from ..serving.launch import serve as run

    rc = run(artifact, sparsity, vllm_args=vllm_args or (), log=say, **kw)
    if rc:
        console.print(f"[bold red]error:[/] the vLLM server exited with status {rc} (its log is above)")
        raise typer.Exit(rc if 0 < rc < 256 else 1)
