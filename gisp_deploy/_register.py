"""Register the gisp_* model types with transformers lazily, so that `import gisp_deploy` stays cheap.

`gisp_deploy.modeling` registers its classes with AutoConfig / AutoModelForCausalLM when imported, but
importing it costs torch and transformers' model code (seconds). So `import gisp_deploy` only installs
an import hook: once transformers' `models.auto.modeling_auto` has been imported (by any
`from transformers import AutoModel...`, or by any transformers model class, which imports it), the
hook imports gisp_deploy.modeling, at the first point where no transformers/torch module is still
half-initialised (importing it in the middle of, say, modeling_llama's own import would be circular).
By then transformers' heavy imports are paid anyway, so the registration adds only ~0.1 s.
A program that uses only AutoConfig on an exported slice should `import gisp_deploy.modeling`.

Standard library only: this module is imported by `import gisp_deploy`.
"""

from __future__ import annotations

import sys
import threading
import warnings

TRIGGER = "transformers.models.auto.modeling_auto"
TARGET = "gisp_deploy.modeling"
_WRAPPED = "transformers."  # modules whose import end is a chance to register
_WATCHED = ("transformers", "torch")  # packages gisp_deploy.modeling imports: none may be half-imported
_lock = threading.RLock()
_done = False


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _safe_now(just_loaded: str | None = None) -> bool:
    """No transformers/torch module (other than the one whose import is just ending) is half-imported."""
    for name in list(sys.modules):
        if name != just_loaded and name.split(".", 1)[0] in _WATCHED and _initializing(name):
            return False
    return True


def _register(just_loaded: str | None = None) -> None:
    global _done
    with _lock:
        if _done or TRIGGER not in sys.modules or not _safe_now(just_loaded):
            return
        _done = True
        _uninstall()
        if TARGET in sys.modules:  # imported (or being imported): it registers itself
            return
        try:
            __import__(TARGET)
        except Exception as e:  # never break the user's transformers import over this
            warnings.warn(f"gisp-deploy could not register its model classes with transformers ({type(e).__name__}: "
                          f"{e}); `import gisp_deploy.modeling` to see the error", RuntimeWarning, stacklevel=2)


class _AfterImportFinder:
    """A meta-path finder that finds nothing itself: it wraps the loader of each transformers module
    so that `_register` runs when that module's import ends."""

    def find_spec(self, name, path=None, target=None):
        if _done or not name.startswith(_WRAPPED):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_register(module, _exec=exec_module):
            _exec(module)
            _register(module.__name__)

        try:
            loader.exec_module = exec_then_register  # loaders are per module: this touches only this import
        except (AttributeError, TypeError):
            pass
        return spec

    def invalidate_caches(self):
        pass


_finder = _AfterImportFinder()


def _uninstall() -> None:
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def install() -> None:
    """Register now if transformers' auto classes are loaded (and it is safe), else when they are."""
    with _lock:
        if _done:
            return
        if TRIGGER in sys.modules and _safe_now():
            _register()
        elif _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
