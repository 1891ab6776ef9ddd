"""Every point where transformers' internals moved under llamazh, in one place.

The rest of llamazh calls these helpers instead of touching the moving parts itself, so the next
upgrade is a change to this file. Each point is found by *feature detection* (a forward's
signature, an object's attributes), never by comparing version strings; the releases named
below are where each shape was seen, for the reader.

Each moved point, with the shape on both sides (oldest supported release first):

* cache argument of model, decoder-layer and attention ``forward``: ``past_key_values``
  (5.17.0 - 5.23.x) -> ``cache`` (5.24.0 -; ``past_key_values`` deprecated, removal announced
  for 5.40.0). :func:`cache_arg_name`, :func:`cache_kwargs`, :class:`AttentionContract`.
* the cache in model outputs: ``outputs.past_key_values`` (5.17 - 5.23) -> ``outputs.cache``
  (5.24 -; the old name a deprecated alias). :func:`output_cache`.
* the attention module's call into the cache: ``cache.update(k, v, layer_idx)`` (5.17 - 5.23)
  -> ``cache.update(k, v, layer_idx, kwargs=kwargs)`` (5.24 -). :meth:`AttentionContract.update`.
* rotary embedding ``forward``: under ``@torch.no_grad()`` computing ``inv_freq @ positions``
  (5.17 - 5.23) -> no decorator, ``positions * inv_freq`` (5.24 -); the same fp32 values (one
  product each), and llamazh's replacement keeps ``no_grad``. :func:`check_rotary_forward`.
* ``StaticCache`` roll-back: not croppable (5.17 - 5.23) -> croppable by ``crop(-n)`` (5.24 -).
  :func:`cache_is_croppable`.
* ``DynamicCache.crop(n)`` with ``n > 0``: deprecated "keep the first n" (5.17) -> ``ValueError``
  (5.24); ``crop(-n)``, drop the newest n, means the same in both. :func:`crop_last`.

Points that have not moved in the supported range but that llamazh relies on, reached through
this module too: ``ALL_ATTENTION_FUNCTIONS.get_interface`` (:func:`get_attention_function`),
``AttentionMaskInterface`` (:func:`attention_mask_interface`; top-level export or
``masking_utils``), ``DynamicCache(config=...)`` (:func:`new_dynamic_cache`); and, where they
are used, ``config.rope_parameters`` and ``logits_to_keep`` (both checked by feature).

Before llamazh replaces a ``forward`` on a module it calls :func:`attention_contract` or
:func:`check_rotary_forward`: a signature that is not in the table raises
:class:`UnsupportedTransformersError` naming the class, the installed transformers version and
the way out, instead of running a forward that would silently drop the cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "AttentionContract",
    "UnsupportedTransformersError",
    "attention_contract",
    "attention_mask_interface",
    "cache_arg_name",
    "cache_is_croppable",
    "cache_kwargs",
    "check_rotary_forward",
    "crop_last",
    "get_attention_function",
    "new_dynamic_cache",
    "output_cache",
    "transformers_version",
]

_CACHE_ARGS = ("cache", "past_key_values")  # newest first


class UnsupportedTransformersError(ValueError):
    """transformers' internals have a shape llamazh does not know; nothing was changed."""


def transformers_version() -> str:
    """The installed transformers version (``"not installed"`` if it is absent)."""
    try:
        import transformers
    except ImportError:
        return "not installed"
    return str(transformers.__version__)


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())  # follows functools.wraps
    except (TypeError, ValueError):
        return None


def _unwrap_model(model: Any) -> Any:
    """The model whose ``forward`` names the cache: PEFT and similar wrappers pass it through."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        names = {p.name for p in _parameters(model.forward) or []}
        if names & set(_CACHE_ARGS):
            return model
        inner = None
        if callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        elif isinstance(getattr(model, "base_model", None), torch.nn.Module):
            inner = model.base_model
        if inner is None or inner is model:
            return model
        model = inner
    return model


# ---- the cache argument and the cache in outputs -------------------------------------------


def cache_arg_name(model: Any) -> str:
    """The keyword under which ``model.forward`` takes its KV cache.

    Args:
        model: a transformers causal LM (or a wrapper such as a PEFT model).

    Returns:
        ``"cache"`` (transformers >= 5.24) or ``"past_key_values"`` (5.17 - 5.23).

    Raises:
        UnsupportedTransformersError: the forward takes neither.

    Example:
        >>> model(input_ids=ids, **{cache_arg_name(model): cache}, use_cache=True)
    """
    names = [p.name for p in _parameters(_unwrap_model(model).forward) or []]
    for name in _CACHE_ARGS:
        if name in names:
            return name
    raise UnsupportedTransformersError(
        f"{type(model).__name__}.forward takes no KV cache argument (looked for "
        f"{' or '.join(_CACHE_ARGS)}; its parameters are {names}) with transformers "
        f"{transformers_version()}; llamazh supports transformers causal LMs of 5.17 and newer"
    )


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model.forward``: ``{name: cache, use_cache}``.

    Example:
        >>> logits = model(input_ids=ids, **cache_kwargs(model, cache)).logits
    """
    return {cache_arg_name(model): cache, "use_cache": True}


def output_cache(outputs: Any) -> Any:
    """The KV cache a model returned: ``outputs.cache`` (>= 5.24) or ``outputs.past_key_values``.

    Returns ``None`` if the outputs hold no cache.
    """
    fields = outputs.keys() if callable(getattr(outputs, "keys", None)) else ()
    for name in _CACHE_ARGS:
        if name in fields:
            return outputs[name]
    return None


# ---- caches: creation and roll-back --------------------------------------------------------


def new_dynamic_cache(model: Any) -> Any:
    """A fresh ``DynamicCache`` sized from ``model.config`` (its sliding windows included)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_is_croppable(cache: Any) -> bool:
    """Whether ``cache`` can drop its newest positions (``crop(-n)``) and stay correct.

    ``Cache.is_croppable`` where the cache has it (every supported release; a ``StaticCache``
    answers False up to 5.23 and True from 5.24), else every layer must have ``crop``.
    """
    if getattr(cache, "get_seq_length", None) is None:
        return False
    flag = getattr(cache, "is_croppable", None)
    if isinstance(flag, bool):
        return flag and callable(getattr(cache, "crop", None))
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return all(callable(getattr(layer, "crop", None)) for layer in layers)
    return callable(getattr(cache, "crop", None))


def crop_last(cache: Any, n: int) -> None:
    """Drop the newest ``n > 0`` positions: ``crop(-n)``, which every release reads alike."""
    if n <= 0:
        raise ValueError(f"crop_last drops n > 0 positions, got n={n}")
    cache.crop(-n)


# ---- attention modules -------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionContract:
    """How a Llama-family attention ``forward`` receives and updates its KV cache.

    Attributes:
        cache_arg: the name of the cache parameter (4th, after ``attention_mask``).
        update_kwargs: whether the forward hands its ``**kwargs`` to ``cache.update``.
        releases: the transformers releases where this shape was seen.
    """

    cache_arg: str
    update_kwargs: bool
    releases: str

    def take_cache(self, cache: Any, kwargs: dict[str, Any]) -> Any:
        """The cache of one call to a replacement forward whose 4th parameter is ``cache``.

        Callers of the 5.17 - 5.23 shape pass ``past_key_values=``, which lands in ``kwargs``
        and is taken out here (so it never reaches the attention function); 5.24 callers pass
        ``cache=``. Both at once is an error, as in transformers' own deprecation shim.
        """
        legacy = kwargs.pop("past_key_values", None)
        if cache is not None and legacy is not None:
            raise ValueError("got both cache= and past_key_values=; pass one")
        return cache if cache is not None else legacy

    def update(
        self, cache: Any, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cache.update`` exactly as the module's own forward calls it.

        Args:
            k, v: the new keys/values (B, Hkv, S, D).
        Returns:
            all keys and values the cache holds for this layer, (B, Hkv, Sk, D) each.
        """
        if self.update_kwargs:
            return cache.update(k, v, layer_idx, kwargs=kwargs)
        return cache.update(k, v, layer_idx)


# (parameter names after self, in order) -> contract; the forward ends with **kwargs
_ATTENTION_CONTRACTS: dict[tuple[str, ...], AttentionContract] = {
    ("hidden_states", "position_embeddings", "attention_mask", "past_key_values"): (
        AttentionContract("past_key_values", update_kwargs=False, releases="5.17.0 - 5.23.x")
    ),
    ("hidden_states", "position_embeddings", "attention_mask", "cache"): (
        AttentionContract("cache", update_kwargs=True, releases="5.24.0 -")
    ),
}


def _signature_of_class_forward(module: torch.nn.Module) -> tuple[tuple[str, ...], bool]:
    params = _parameters(type(module).forward) or []
    names = tuple(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    return (names[1:] if names[:1] == ("self",) else names), has_var_kw


def _unknown(module: torch.nn.Module, what: str, names: tuple[str, ...], way_out: str) -> Exception:
    cls = type(module)
    return UnsupportedTransformersError(
        f"{cls.__module__}.{cls.__qualname__}.forward{names} is not a {what} signature llamazh "
        f"knows (transformers {transformers_version()}); llamazh will not replace it, since a "
        f"forward that misreads its arguments can silently drop the KV cache. {way_out}"
    )


def attention_contract(module: torch.nn.Module) -> AttentionContract:
    """The :class:`AttentionContract` of ``module``'s class ``forward``, or an error.

    Raises:
        UnsupportedTransformersError: the signature is none of the known ones; the message
            names the class, the installed transformers version and the way out.
    """
    names, has_var_kw = _signature_of_class_forward(module)
    contract = _ATTENTION_CONTRACTS.get(names) if has_var_kw else None
    if contract is None:
        raise _unknown(
            module,
            "Llama-family attention",
            names,
            "Way out: patch with fused=False (rope only; needs a strategy transformers knows) "
            "and consistent_cache=False, or use attention='llamazh' alone, which goes through "
            "transformers' AttentionInterface and replaces no forward.",
        )
    return contract


def check_rotary_forward(module: torch.nn.Module) -> None:
    """Raise unless ``module``'s class ``forward`` is ``forward(x, position_ids)``.

    Raises:
        UnsupportedTransformersError: any other signature.
    """
    names, _ = _signature_of_class_forward(module)
    if names != ("x", "position_ids"):
        raise _unknown(
            module,
            "rotary-embedding",
            names,
            "Way out: a strategy transformers implements itself (linear, dynamic, yarn, "
            "llama3), which keeps transformers' own rotary forward.",
        )


def get_attention_function(impl: str, eager: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' attention function registered as ``impl`` (``eager`` for ``"eager"``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if get_interface is not None:
        return get_interface(impl, eager)
    return eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


def attention_mask_interface() -> Any:
    """transformers' ``AttentionMaskInterface`` (a top-level export, or ``masking_utils``)."""
    try:
        from transformers import AttentionMaskInterface
    except ImportError:
        from transformers.masking_utils import AttentionMaskInterface
    return AttentionMaskInterface
