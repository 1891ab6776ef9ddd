"""Placeholder: the "llamazh" attention implementation for transformers (issue 4)."""

from __future__ import annotations

from typing import Any


def register() -> None:
    """Register the ``"llamazh"`` attention implementation with transformers (not yet)."""


def patch_attention(model: Any, attention: str) -> list:
    """Route a model's attention through llamazh (not yet implemented)."""
    raise NotImplementedError("attention patching is not implemented yet")
