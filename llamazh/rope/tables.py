"""cos/sin tables: always computed in fp32 (a bf16 angle at position 4,000 is off by ~16
radians), then cast to the model's dtype."""

from __future__ import annotations

import torch

__all__ = ["rope_cos_sin"]


def rope_cos_sin(
    inv_freq: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    attention_factor: float = 1.0,
    dtype: torch.dtype | None = None,
    full_width: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``position * inv_freq`` (times the strategy's ``attention_factor``).

    Args:
        inv_freq: ``(R/2,)`` inverse frequencies (from a strategy's ``inv_freq``).
        position_ids: integer positions, any shape ``(...)``, e.g. ``(B, S)`` or ``(S,)``.
        attention_factor: multiplies cos and sin (YaRN); 1.0 otherwise.
        dtype: output dtype (default fp32). The math is fp32 whatever this is.
        full_width: ``True`` gives transformers' layout ``(..., R)`` with the two halves
            equal (``cat((f, f))``); ``False`` gives one value per rotated pair ``(..., R/2)``.

    Returns:
        ``(cos, sin)``, each ``(..., R)`` or ``(..., R/2)``.

    Example:
        >>> inv_freq, scale = YaRNScaling(factor=4.0, original_max_position=256).inv_freq(64, 1e4)
        >>> cos, sin = rope_cos_sin(inv_freq, torch.arange(1024)[None], attention_factor=scale)
        >>> cos.shape
        torch.Size([1, 1024, 64])
    """
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be 1-D (R/2,), got shape {tuple(inv_freq.shape)}")
    if position_ids.is_floating_point() or position_ids.is_complex():
        raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    # same operations and order as transformers' LlamaRotaryEmbedding.forward, so a patched
    # model reproduces a natively built one bit for bit
    freqs = position_ids[..., None].float() * inv_freq.to(
        device=position_ids.device, dtype=torch.float
    )
    emb = torch.cat((freqs, freqs), dim=-1) if full_width else freqs
    cos = emb.cos() * attention_factor
    sin = emb.sin() * attention_factor
    out_dtype = dtype or torch.float32
    return cos.to(dtype=out_dtype), sin.to(dtype=out_dtype)
