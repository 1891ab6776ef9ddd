"""Reading files users hand us: errors name the file and what was expected.

``safetensors`` and ``json`` report a truncated or broken file as a bare
``SafetensorError``/``JSONDecodeError`` naming no file; these helpers re-raise them as
``ValueError`` with the path and the likely cause.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike[str], what: str = "a JSON file") -> Any:
    """Parse the UTF-8 JSON file ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not valid UTF-8 JSON; the message names the file, ``what`` it
            should be and where parsing stopped.

    Example:
        >>> read_json("adapter/adapter_config.json", "a PEFT adapter config")["r"]
        16
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{str(path)!r} should be {what} (JSON) but cannot be parsed: {exc}; "
            "the file is corrupt or truncated (an interrupted copy?)"
        ) from None


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike[str]) -> Iterator[Any]:
    """``safetensors.safe_open(path, framework="pt")`` with an error that names the file.

    Raises:
        ValueError: ``path`` is not a readable safetensors file (truncated, not safetensors).

    Example:
        >>> with open_safetensors("model.safetensors") as f:
        ...     shape = f.get_slice("lm_head.weight").get_shape()
    """
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise _corrupt(path, exc) from None
    with handle as f:
        yield f


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All tensors of the safetensors file ``path`` (``safetensors.torch.load_file``).

    Raises:
        ValueError: ``path`` is not a readable safetensors file.

    Example:
        >>> tensors = load_safetensors("adapter/adapter_model.safetensors")
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise _corrupt(path, exc) from None


def _corrupt(path: str | os.PathLike[str], exc: Exception) -> ValueError:
    return ValueError(
        f"{str(path)!r} should be a safetensors file but cannot be read ({exc}); "
        "it is truncated or corrupt (an interrupted write or download?): recreate it"
    )
