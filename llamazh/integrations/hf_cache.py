"""transformers KV caches as the speculative loop and CFG need them: create, measure, roll back.

Rolling back means dropping the newest positions, always as ``crop(-n)`` with ``n > 0`` (the
one form every supported release reads alike; see :mod:`llamazh.integrations.hf_compat`). A
cache that cannot be rolled back is refused up front, by feature detection, never by version.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from llamazh.integrations.hf_compat import (
    cache_is_croppable,
    cache_kwargs,
    crop_last,
    new_dynamic_cache,
    output_cache,
)

__all__ = [
    "accepts_logits_to_keep",
    "cache_kwargs",
    "cache_length",
    "check_rollback_cache",
    "crop_cache",
    "model_device",
    "new_dynamic_cache",
    "output_cache",
    "output_vocab_size",
]


def check_rollback_cache(cache: Any, name: str) -> Any:
    """Return ``cache`` if it can be cropped (rolled back), else raise ``ValueError``."""
    if not cache_is_croppable(cache):
        raise ValueError(
            f"{name} is a {type(cache).__name__}, which cannot be rolled back after rejected "
            "drafts in this transformers release (it is not croppable); speculative decoding "
            "needs a cache that can drop positions, e.g. transformers.DynamicCache (or pass None "
            "to get one)"
        )
    return cache


def cache_length(cache: Any) -> int:
    """Number of positions held by ``cache``."""
    return int(cache.get_seq_length())


def crop_cache(cache: Any, length: int) -> None:
    """Drop positions so that ``cache`` holds exactly its first ``length`` positions."""
    extra = cache_length(cache) - length
    if extra < 0:
        raise ValueError(
            f"cannot crop a cache of {cache_length(cache)} positions to length={length}"
        )
    if extra > 0:
        crop_last(cache, extra)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (skip the LM head on prefills)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def output_vocab_size(model: Any) -> int:
    """Width of ``model``'s logits: rows of its output embedding, else ``config.vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def model_device(model: Any) -> torch.device:
    """Device of ``model``'s first parameter."""
    return next(model.parameters()).device
