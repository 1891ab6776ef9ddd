"""Run callbacks once transformers is imported, without importing it ourselves.

``import llamazh`` must stay light (no transformers, no Triton), yet the ``"llamazh"``
attention implementation has to be registered with transformers before a user calls
``from_pretrained(..., attn_implementation="llamazh")``. A meta-path finder wraps the loader
of the top-level ``transformers`` package and runs the callbacks right after it executes; if
transformers is already imported, callbacks run immediately.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

_callbacks: list[Callable[[], None]] = []


def _call(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception as exc:  # a broken registration must never break `import transformers`
        warnings.warn(
            f"llamazh could not register with transformers: {exc!r}", RuntimeWarning, stacklevel=3
        )


def _run_callbacks() -> None:
    for callback in _callbacks:
        _call(callback)


class _TransformersFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[override]
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot, and no recursion in the lookup below
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_notify(module: ModuleType) -> None:
            exec_module(module)
            _run_callbacks()

        spec.loader.exec_module = exec_and_notify  # type: ignore[method-assign]
        return spec


def on_transformers_import(callback: Callable[[], None]) -> None:
    """Call ``callback()`` now if transformers is imported, else right after its import.

    Args:
        callback: a function of no arguments; exceptions it raises become ``RuntimeWarning``s.
    """
    if "transformers" in sys.modules:
        _call(callback)
        return
    _callbacks.append(callback)
    if not any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersFinder())
