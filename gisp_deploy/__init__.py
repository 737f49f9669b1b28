"""gisp-deploy: prune once with GISP, slice any sparsity at load time, deploy many.

The Python API beside every command (plain keyword arguments; the commands only parse and call them):
`prune`, `reorder`, `load`, `fit`, `export`, `serve`, `check`, `bench`. Each is imported on first use, so `import gisp_deploy`
stays cheap.
"""

from . import _register

__version__ = "0.1.0"

# Exported slices (model_type gisp_llama, ...) load with AutoModelForCausalLM.from_pretrained once gisp_deploy
# is imported. The registration waits until transformers' auto classes are imported: see _register.py.
_register.install()

_API = {"prune": ("pruning.run", "prune"), "reorder": ("pruning.reorder", "reorder"),
        "load": ("slicing.loader", "load"), "fit": ("budget", "fit"),
        "export": ("slicing.export", "export_slice"), "serve": ("deploy", "serve"),
        "check": ("quality.check", "check"), "bench": ("benchmark.bench", "bench")}


def __getattr__(name):
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
