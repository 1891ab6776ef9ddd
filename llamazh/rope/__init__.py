"""Rotary position embeddings: scaling strategies, tables, the fused kernel, evaluation.

``from llamazh.rope import YaRNScaling`` imports neither Triton nor transformers: the kernel
is imported when first launched, transformers only by :mod:`llamazh.integrations.hf_rope`.

Strategies (frozen dataclasses, one method ``inv_freq(head_dim, base, *, seq_len=None)``):
:class:`NoScaling`, :class:`LinearScaling`, :class:`NTKScaling`, :class:`DynamicNTKScaling`,
:class:`AdaptiveNTKScaling`, :class:`YaRNScaling` (``dynamic=True`` for dynamic YaRN),
:class:`Llama3Scaling`. :func:`from_hf` / ``.to_hf()`` convert to and from transformers'
``config.rope_parameters``.

Dynamic strategies and the KV cache: a dynamic strategy picks its frequencies from the current
length, but keys already in a KV cache were rotated with the frequencies of the length at which
they were written, so past the original length cached keys and new queries disagree
(transformers' dynamic NTK behaves so: decoding through the cache differs from one forward of
the same text). :func:`llamazh.integrations.hf_rope.patch_rope` with ``consistent_cache=True``
caches keys unrotated and rotates all of them with the current frequencies at every step.
"""

from llamazh.rope.apply import RotaryEmbedding, apply_rotary, apply_rotary_reference
from llamazh.rope.band_strategies import Llama3Scaling, YaRNScaling
from llamazh.rope.config import REGISTRY, from_hf
from llamazh.rope.strategies import (
    AdaptiveNTKScaling,
    DynamicNTKScaling,
    LinearScaling,
    NoScaling,
    NTKScaling,
    RopeScaling,
)
from llamazh.rope.tables import rope_cos_sin

__all__ = [
    "REGISTRY",
    "AdaptiveNTKScaling",
    "DynamicNTKScaling",
    "LinearScaling",
    "Llama3Scaling",
    "NTKScaling",
    "NoScaling",
    "RopeScaling",
    "RotaryEmbedding",
    "YaRNScaling",
    "apply_rotary",
    "apply_rotary_reference",
    "from_hf",
    "rope_cos_sin",
]
