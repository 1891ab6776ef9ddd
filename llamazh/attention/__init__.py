"""Exact attention: FlashAttention-2 in Triton, a backend dispatcher, and the eager reference.

* :func:`flash_attn_func`, :func:`flash_attn_varlen_func`: the llamazh Triton kernels, with
  flash-attn's functional API (CUDA; CPU under ``TRITON_INTERPRET=1``).
* :func:`attention`: the same semantics on any device, ``backend="auto"|"flash_attn"|"triton"|
  "sdpa"|"eager"`` resolved at call time.
* :func:`attention_reference`: the plain PyTorch definition every backend is tested against.

Importing this module does not import Triton; the kernels load on first use.
"""

from llamazh.attention.dispatch import BACKENDS, attention, resolve_backend
from llamazh.attention.functions import flash_attn_func, flash_attn_varlen_func
from llamazh.attention.reference import (
    attention_reference,
    varlen_attention_reference,
    window_mask,
)

__all__ = [
    "BACKENDS",
    "attention",
    "attention_reference",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "resolve_backend",
    "varlen_attention_reference",
    "window_mask",
]
