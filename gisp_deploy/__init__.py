"""gisp-deploy: prune once with GISP, slice any sparsity at load time, deploy many."""

from . import _register

__version__ = "0.1.0"

# Exported slices (model_type gisp_llama, ...) load with AutoModelForCausalLM.from_pretrained once gisp_deploy
# is imported. The registration waits until transformers' auto classes are imported: see _register.py.
_register.install()


def __getattr__(name):  # `from gisp_deploy import load` without importing torch/transformers up front
    if name == "load":
        from .loader import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
