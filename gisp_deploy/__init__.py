"""gisp-deploy: prune once with GISP, slice any sparsity at load time, deploy many."""

__version__ = "0.1.0"


def __getattr__(name):  # `from gisp_deploy import load` without importing torch/transformers up front
    if name == "load":
        from .loader import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
