"""The plain PyTorch reference of llamazh attention: the semantics every backend must match.

It materialises the (Sq, Sk) score matrix, so it is for tests, CPUs and short sequences. Same
conventions as the kernels: (B, S, H, D) layout, GQA by fewer key/value heads, causal masks
aligned bottom-right (flash-attn >= 2.1), ``window_size=(left, right)`` with -1 = unbounded,
``softcap`` applied as ``softcap * tanh(scores / softcap)``, rows with no visible key give 0.
"""

from __future__ import annotations

import math

import torch


def window_mask(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean (Sq, Sk) mask, True where query ``i`` may attend to key ``j``.

    Query ``i`` sits at key position ``i + Sk - Sq``; it sees ``j`` iff
    ``i + off - left <= j <= i + off + right`` (causal: ``right = 0``; -1: unbounded).

    Example:
        >>> window_mask(2, 3, causal=True)
        tensor([[ True,  True, False],
                [ True,  True,  True]])
    """
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= i + right
    if left >= 0:
        mask &= j >= i - left
    return mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    upcast: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with llamazh semantics (differentiable, any device).

    Args:
        q: (B, Sq, H, D). k, v: (B, Sk, Hkv, D) with H % Hkv == 0.
        causal, softmax_scale, window_size, softcap: as :func:`llamazh.attention.flash_attn_func`.
        upcast: compute in float32 (at least) and cast the output back to ``q.dtype``; with
            ``False`` the math runs in ``q.dtype`` (the "plain PyTorch" baseline of the tests).
        return_lse: also return the log-sum-exp of the scaled scores, fp32 (B, H, Sq);
            -inf for rows with no visible key.

    Returns:
        out (B, Sq, H, D) in ``q.dtype`` (and lse if asked).

    Example:
        >>> q = torch.randn(1, 5, 4, 32); kv = torch.randn(1, 7, 2, 32)
        >>> attention_reference(q, kv, kv, causal=True).shape
        torch.Size([1, 5, 4, 32])
    """
    _, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    qf, kf, vf = (t.to(dtype) for t in (q, k, v))
    if hkv != h:
        # (B, Sk, Hkv, D) -> (B, Sk, H, D): query head h reads key/value head h // (H / Hkv)
        kf = kf.repeat_interleave(h // hkv, dim=2)
        vf = vf.repeat_interleave(h // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale  # (B, H, Sq, Sk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    mask = window_mask(sq, sk, causal=causal, window_size=window_size, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    visible = mask.any(-1)[:, None]  # (Sq, 1): rows with at least one key
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(visible, probs, torch.zeros((), dtype=probs.dtype, device=q.device))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype)  # (B, Sq, H, D)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores.float(), dim=-1)  # (B, H, Sq), -inf on empty rows
    return out, lse


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """:func:`attention_reference` on packed sequences: q (total_q, H, D), k/v (total_k, Hkv, D).

    Sequence ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` (and likewise for k, v); no
    attention crosses sequence boundaries. Keyword arguments go to :func:`attention_reference`
    (``return_lse`` is not supported here).
    """
    outs = []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b] : cq[b + 1]].unsqueeze(0)  # (1, Sq_b, H, D)
        kb = k[ck[b] : ck[b + 1]].unsqueeze(0)
        vb = v[ck[b] : ck[b + 1]].unsqueeze(0)
        outs.append(attention_reference(qb, kb, vb, **kwargs)[0])
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)
