"""Rotary position embeddings: scaling strategies, tables, the fused kernel, evaluation.

``from llamazh.rope import YaRNScaling`` imports neither Triton nor transformers: the kernel
is imported when first launched, transformers only by :mod:`llamazh.integrations.hf_rope`.

Strategies (frozen dataclasses, one method ``inv_freq(head_dim, base, *, seq_len=None)``):
:class:`NoScaling`, :class:`LinearScaling`, :class:`NTKScaling`, :class:`DynamicNTKScaling`,
:class:`AdaptiveNTKScaling`, :class:`YaRNScaling` (``dynamic=True`` for dynamic YaRN),
:class:`Llama3Scaling`. :func:`from_hf` / ``.to_hf()`` convert to and from transformers'
``config.rope_parameters``.

Dynamic strategies and the KV cache: a dynamic strategy picks its frequencies from the current
length, but keys already in a KV cache were rotated with the frequencies of the length at the
time they were written. During generation past the original length, old keys and new queries
then disagree (transformers' dynamic NTK has this property; its outputs differ from a
no-cache forward of the same text). ``llamazh.patch(model, rope=..., cache_consistent=True)``
is not offered; instead :func:`llamazh.integrations.hf_rope.patch_rope` takes
``consistent_cache=True``, which caches keys *unrotated* and rotates the whole cache with the
current frequencies at every step (exactly a no-cache forward, at the cost of rotating the
cached keys once per step).
"""

from llamazh.rope.apply import RotaryEmbedding, apply_rotary, apply_rotary_reference
from llamazh.rope.config import REGISTRY, from_hf
from llamazh.rope.strategies import (
    AdaptiveNTKScaling,
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    NoScaling,
    NTKScaling,
    RopeScaling,
    YaRNScaling,
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
