"""transformers KV caches as the speculative loop and CFG need them: create, measure, roll back.

Rolling back means dropping the newest positions. transformers' ``DynamicCache.crop(n)`` means
"remove -n tokens" for negative n in every 5.x release, while a positive n is an absolute length
in 5.17 and an error in 5.23, and ``crop(0)`` empties the cache in old releases; so only
``crop(-n)`` with ``n > 0`` is ever called here. A cache whose layers cannot be cropped (a
``StaticCache``) is refused up front, by feature detection, never by version.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def new_dynamic_cache(model: Any) -> Any:
    """A fresh ``DynamicCache`` for ``model`` (sized from its config where supported)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signatures without ``config``
        return DynamicCache()


def check_rollback_cache(cache: Any, name: str) -> Any:
    """Return ``cache`` if it can be cropped (rolled back), else raise ``ValueError``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        ok = all(callable(getattr(layer, "crop", None)) for layer in layers)
    else:
        ok = callable(getattr(cache, "crop", None))
    if not ok or getattr(cache, "get_seq_length", None) is None:
        raise ValueError(
            f"{name} is a {type(cache).__name__}, which cannot be rolled back after rejected "
            "drafts (its layers have no crop); speculative decoding needs a cache that can "
            "drop positions, e.g. transformers.DynamicCache (or pass None to get one)"
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
        cache.crop(-extra)


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
