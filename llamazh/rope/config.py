"""The strategy registry and strict conversion from transformers' ``config.rope_parameters``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from llamazh.rope.band_strategies import Llama3Scaling, YaRNScaling
from llamazh.rope.strategies import (
    AdaptiveNTKScaling,
    DynamicNTKScaling,
    LinearScaling,
    NoScaling,
    NTKScaling,
    RopeScaling,
)

__all__ = ["HF_MODEL_KEYS", "REGISTRY", "from_hf"]

#: strategy name -> class
REGISTRY: dict[str, type[RopeScaling]] = {
    cls.name: cls
    for cls in (
        NoScaling,
        LinearScaling,
        NTKScaling,
        DynamicNTKScaling,
        AdaptiveNTKScaling,
        YaRNScaling,
        Llama3Scaling,
    )
}

#: keys of ``rope_parameters`` that describe the model, not the strategy
HF_MODEL_KEYS = ("rope_theta", "partial_rotary_factor")

# rope_type -> class; "llamazh_*" types are written by llamazh for strategies transformers lacks
_BY_ROPE_TYPE: dict[str, type[RopeScaling]] = {
    "default": NoScaling,
    "linear": LinearScaling,
    "dynamic": DynamicNTKScaling,
    "yarn": YaRNScaling,
    "llama3": Llama3Scaling,
    "llamazh_ntk": NTKScaling,
    "llamazh_adaptive_ntk": AdaptiveNTKScaling,
    "llamazh_dynamic_yarn": YaRNScaling,
}


def from_hf(
    rope_parameters: Mapping[str, Any], *, max_position_embeddings: int | None = None
) -> RopeScaling:
    """Parse ``config.rope_parameters`` (or the legacy ``rope_scaling``) into a strategy.

    Strict: an unknown ``rope_type``, an unknown key or an out-of-range value raises and says
    what is accepted. ``rope_theta`` and ``partial_rotary_factor`` describe the model and are
    ignored here. ``max_position_embeddings`` (the model config's) supplies the original length
    where transformers reads it from there (``dynamic``; ``yarn``/``llama3`` when the key is
    absent; ``llamazh_adaptive_ntk``).

    Raises:
        TypeError: ``rope_parameters`` is not a mapping, or a value has the wrong type.
        ValueError: unknown type or key, missing key, or a value out of range.

    Example:
        >>> from_hf({"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096})
        YaRNScaling(factor=16.0, original_max_position=4096, ...)
    """
    if not isinstance(rope_parameters, Mapping):
        raise TypeError(
            f"rope_parameters must be a dict, got {type(rope_parameters).__name__}: "
            f"{rope_parameters!r}"
        )
    params = dict(rope_parameters)
    legacy = params.pop("type", None)
    rope_type = params.pop("rope_type", legacy) or "default"
    cls = _BY_ROPE_TYPE.get(rope_type)
    if cls is None:
        raise ValueError(
            f"rope_parameters['rope_type'] must be one of {sorted(_BY_ROPE_TYPE)}; "
            f"got rope_type={rope_type!r}"
        )
    for key in HF_MODEL_KEYS:
        params.pop(key, None)
    if rope_type.startswith("llamazh_"):
        params.pop("requires", None)
    if cls is DynamicNTKScaling:
        return _dynamic_from_hf(params, max_position_embeddings)
    if (
        cls in (YaRNScaling, Llama3Scaling)
        and "original_max_position_embeddings" not in params
        and max_position_embeddings is not None
    ):
        params["original_max_position_embeddings"] = max_position_embeddings
    strategy = cls._from_fields(params)
    if rope_type == "llamazh_dynamic_yarn":
        strategy = replace(strategy, dynamic=True)
    if max_position_embeddings is not None:
        strategy = strategy.with_defaults(max_position_embeddings)
    return strategy


def _dynamic_from_hf(params: dict[str, Any], max_position_embeddings: int | None) -> RopeScaling:
    unknown = sorted(set(params) - {"factor"})
    if unknown:
        raise ValueError(
            f"rope_parameters for DynamicNTKScaling has unknown keys {unknown}; accepted: "
            f"['factor', 'rope_theta', 'rope_type', 'partial_rotary_factor']"
        )
    if "factor" not in params:
        raise ValueError("rope_parameters for DynamicNTKScaling is missing keys ['factor']")
    if max_position_embeddings is None:
        raise ValueError(
            "rope_type='dynamic' takes its original length from the model config: pass "
            "from_hf(..., max_position_embeddings=config.max_position_embeddings)"
        )
    return DynamicNTKScaling(params["factor"], max_position_embeddings)
