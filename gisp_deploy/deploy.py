"""One call across two stages: `serve(..., refit=)` exports the corrected slice (slicing), then serves it (serving).

The stages never import each other, so the serving stage cannot correct a slice itself: vLLM runs the corrected
weights that `export(..., refit=)` writes, exactly what `load(..., refit=)` gives (tests/serving/test_vllm.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .arguments import check_served_refit
from .serving.launch import check_port, check_serve_options
from .serving.launch import serve as serve_slice


def serve(artifact, sparsity: float | None = None, *, refit: str = "none", export_dir=None, log=print,
          **options) -> int:
    """`gisp-deploy serve` from Python: `serving.launch.serve(artifact, sparsity, **options)` (its options: host,
    port, budgets, vLLM's arguments ...), or with `refit` (ls, ec, ecr) the slice at `sparsity` with that
    load-time correction: exported (fp64 solves, the artifact's dtype) into a temporary directory under
    `export_dir` (default: the system's, $TMPDIR), served as written, and removed when the server stops.
    Returns the server's exit status.

        gisp_deploy.serve("llama3-gisp", 0.4, refit="ecr", port=8001)"""
    if check_served_refit(refit, sparsity, [options.get(k) for k in ("fit_memory", "fit_params", "fit_speedup")]) \
            == "none":
        return serve_slice(artifact, sparsity, log=log, **options)
    tp, multiple = options.get("tensor_parallel_size", 1), options.get("channel_multiple", 1)
    check_serve_options(Path(artifact), port=options.get("port", 8000), tensor_parallel_size=tp,
                        vllm_args=options.get("vllm_args", ()))
    check_port(options.get("host", "127.0.0.1"), options.get("port", 8000))  # before minutes of export, not after
    name = options.pop("served_model_name", None) or f"{Path(artifact).resolve().name}@{sparsity:g}+{refit}"
    digest = options.pop("expect_digest", None)
    from .slicing.export import export_slice  # torch: only for a corrected slice (a plain serve starts vLLM sooner)

    with tempfile.TemporaryDirectory(prefix="gisp-refit-", dir=export_dir) as tmp:
        out = Path(tmp) / f"{Path(artifact).name}-{sparsity:g}-{refit}"
        export_slice(artifact, out, sparsity, tp_size=tp, channel_multiple=multiple, refit=refit,
                     verify=options.get("verify", True), expect_digest=digest)
        log(f"corrected slice ({refit}) exported to {out} for serving")
        return serve_slice(out, None, served_model_name=name, log=log, **options)
