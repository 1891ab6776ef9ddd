"""Read generation settings the way ``model.generate`` does, for llamazh's own decoding loops.

Priority, as in transformers' ``GenerationMixin._prepare_generation_config`` (5.17-5.25):
an explicit argument > the ``generation_config`` passed in > ``model.generation_config`` >
transformers' global defaults (``max_length=20``, ``top_k=50``, ...). Lengths follow
``_prepare_generated_length``: ``max_new_tokens`` wins over ``max_length``; the default
``max_length`` counts new tokens and is capped by ``max_position_embeddings``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llamazh._checks import check_positive_int

# transformers' GenerationConfig._get_default_generation_params(), the fields used here
_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
}
# generate would apply these when set; this loop does not, so it refuses rather than differ
_UNSUPPORTED: dict[str, Any] = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "stop_strings": None,
    "encoder_repetition_penalty": 1.0,
    "dola_layers": None,
    "penalty_alpha": None,
}


@dataclass(frozen=True)
class GenerationSettings:
    """What one ``generate``-like call does, resolved for a prompt of a given length.

    Attributes:
        max_new_tokens: >= 1 tokens to generate at most.
        min_new_tokens: the EOS ids are masked until this many tokens were generated.
        eos_token_ids: ids that end generation (empty: only the length does).
        pad_token_id: the model's pad id (batch 1 never pads; kept for reporting).
        do_sample, temperature, top_k, top_p, repetition_penalty: as in ``generate``
            (``top_k=None``/``top_p=1.0``/``repetition_penalty=1.0`` mean off).
    """

    max_new_tokens: int
    min_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float
    repetition_penalty: float


def _class_default(configs: list[Any], name: str) -> Any:
    """``name``'s value in a fresh config of the same class (None where nothing is set)."""
    try:
        return getattr(type(configs[0])(), name, None) if configs else None
    except Exception:  # a config class that cannot be built without arguments
        return None


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    """``None``, an id, or a list of ids -> a tuple of ids (checked)."""
    if value is None:
        return ()
    ids = [value] if isinstance(value, int) else value
    if not isinstance(ids, Sequence) or isinstance(ids, str):
        ids = None
    if ids is None or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"{name} must be an int >= 0 or a list of them, got {name}={value!r}")
    return tuple(ids)


def resolve_generation(
    model: Any, prompt_length: int, generation_config: Any = None, **kwargs: Any
) -> GenerationSettings:
    """Resolve ``generate``'s settings for a prompt of ``prompt_length`` tokens.

    Args:
        model: a transformers model (its ``generation_config`` and ``config`` are read; a model
            without them takes transformers' global defaults).
        prompt_length: tokens in the prompt (>= 1).
        generation_config: a ``transformers.GenerationConfig`` overriding the model's, or None.
        **kwargs: ``max_new_tokens``, ``max_length``, ``min_new_tokens``, ``min_length``,
            ``eos_token_id``, ``pad_token_id``, ``do_sample``, ``temperature``, ``top_k``,
            ``top_p``, ``repetition_penalty``; ``None`` means "not given".

    Returns:
        :class:`GenerationSettings`.

    Raises:
        ValueError: a bad id, a length that leaves no room for a new token, or a setting
            ``generate`` would apply that llamazh's loop does not implement (beam search,
            ``no_repeat_ngram_size``, ``stop_strings``, ...).

    Example:
        >>> s = resolve_generation(model, ids.shape[1], max_new_tokens=32)
        >>> s.eos_token_ids        # e.g. (2,) from model.generation_config
    """
    own = getattr(model, "generation_config", None)
    configs = [c for c in (generation_config, own) if c is not None]

    def first(name: str) -> Any:
        return next((v for c in configs if (v := getattr(c, name, None)) is not None), None)

    def get(name: str, default: Any = None) -> Any:
        if kwargs.get(name) is not None:
            return kwargs[name]
        found = first(name)
        return _DEFAULTS.get(name, default) if found is None else found

    for name, off in _UNSUPPORTED.items():
        value = get(name, off)
        if value is not None and value != off and value != []:
            raise ValueError(
                f"generation_config.{name}={value!r} is set: generate would apply it and "
                f"speculative decoding does not, so the outputs would differ; set it to {off!r}"
            )
    max_new = kwargs.get("max_new_tokens")
    max_length = kwargs.get("max_length")
    if max_new is None and max_length is None:
        max_new, max_length = first("max_new_tokens"), first("max_length")
        if max_length is not None and max_length == _class_default(configs, "max_length"):
            max_length = None  # older releases store the default 20 itself: still "unset"
    if max_new is not None:
        check_positive_int("max_new_tokens", max_new)
    elif max_length is not None:
        max_new = max_length - prompt_length
        if max_new < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room after the {prompt_length}-token prompt;"
                " pass max_new_tokens"
            )
    else:  # transformers' default: 20 new tokens, within the model's positions
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_new = _DEFAULTS["max_length"]
        if positions is not None:
            max_new = max(1, min(max_new, positions - prompt_length))
    min_new = kwargs.get("min_new_tokens")
    if min_new is None and kwargs.get("min_length") is None:
        min_new = first("min_new_tokens")
    if min_new is None:
        min_new = max(0, int(get("min_length")) - prompt_length)
    check_positive_int("min_new_tokens", min_new, minimum=0)
    top_k = get("top_k")
    pad = get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 0):
        raise ValueError(f"pad_token_id must be an int >= 0, got pad_token_id={pad!r}")
    return GenerationSettings(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        eos_token_ids=_token_ids("eos_token_id", get("eos_token_id")),
        pad_token_id=pad,
        do_sample=get("do_sample"),
        temperature=get("temperature"),
        top_k=None if top_k == 0 else top_k,
        top_p=get("top_p"),
        repetition_penalty=get("repetition_penalty"),
    )
