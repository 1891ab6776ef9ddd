"""Argument checks shared by the public API: each rule written once, each error names the
argument, its value and what was expected."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools rejected), else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return value


def check_positive_float(name: str, value: Any, *, strict: bool = True) -> float:
    """Return ``float(value)`` if it is a finite number > 0 (>= 0 if not strict), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {name}={value!r} ({type(value).__name__})")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {name}={value}")
    if (value <= 0) if strict else (value < 0):
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"{name} must be {bound}, got {name}={value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise listing them."""
    choices = list(choices)
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}; got {name}={value!r}")
    return value


def check_texts(name: str, texts: Any, *, empty: str = "drop") -> list[str]:
    """Return ``texts`` as a list of strings, else raise.

    A single ``str`` (a common slip: it would be read character by character) and any item that
    is not a ``str`` raise ``TypeError``; no texts raise ``ValueError``. Empty strings are
    dropped with ``empty="drop"`` (an error if none is left) or refused with ``"refuse"``.
    """
    check_choice("empty", empty, ("drop", "refuse"))
    if isinstance(texts, str):
        raise TypeError(
            f"{name} must be a sequence of strings, got a single str; wrap it in a list"
        )
    if not isinstance(texts, Iterable):
        raise TypeError(f"{name} must be a sequence of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} must not be empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
        if not t and empty == "refuse":
            raise ValueError(f"{name}[{i}] must be a non-empty string, got ''")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"{name} holds only empty strings")
    return texts


def check_file(name: str, path: str | os.PathLike[str]) -> Path:
    """Return ``Path(path)`` if it is an existing regular file, else raise ``FileNotFoundError``."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"{name} must be an existing file, but {str(p)!r} {what}")
    return p


def check_new_path(name: str, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Return ``Path(path)`` if nothing exists there (or ``overwrite``), else raise."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(
            f"{name}={str(p)!r} already exists; choose a new path or pass overwrite=True"
        )
    return p


def check_window_size(name: str, value: Any) -> tuple[int, int]:
    """Return ``(left, right)`` if ``value`` is a pair of ints >= -1 (-1 = unbounded)."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if ok:
        ok = all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in value)
    if not ok:
        raise ValueError(f"{name} must be a pair of ints >= -1 (-1 = unbounded), got {value!r}")
    return int(value[0]), int(value[1])


def check_softcap(name: str, value: Any) -> float:
    """Return ``float(value)`` if it is a finite number >= 0 (0 disables the cap), else raise."""
    return check_positive_float(name, value, strict=False)
