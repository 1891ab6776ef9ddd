"""``flash_attn_func`` / ``flash_attn_varlen_func``: the llamazh Triton FlashAttention-2.

Modelled on flash-attn's functional API (2.6+) so users can swap one import for the other.
The kernels live in :mod:`llamazh.kernels`; this module checks arguments, allocates outputs and
wires forward and backward into autograd.
"""

from __future__ import annotations

import math

import torch

from llamazh._checks import check_positive_int, check_softcap, check_window_size

DECODE_MAX_SEQLEN_Q = 16
DECODE_MAX_ROWS = 128
DECODE_MIN_SEQLEN_K = 128


def _kernels():
    try:
        from llamazh.kernels import flash_attn_bwd, flash_attn_common, flash_attn_fwd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the llamazh attention kernels need Triton: pip install 'llamazh[triton]'"
        ) from exc
    return flash_attn_common, flash_attn_fwd, flash_attn_bwd


def _check_options(
    causal: object, softmax_scale: object, window_size: object, softcap: object, head_dim: int
) -> tuple[float, tuple[int, int], float]:
    common, _, _ = _kernels()
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got causal={causal!r}")
    window = check_window_size("window_size", window_size)
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool):
        scale = float(softmax_scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale}")
    else:
        raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
    softcap = check_softcap("softcap", softcap)
    return scale, common.mask_params(causal, window), softcap


class _FlashAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, window, softcap, cu_q, cu_k, max_q, max_k):
        _, fwd, _ = _kernels()
        out = q.new_empty(q.shape)  # contiguous (B, Sq, H, D) whatever the strides of q
        if cu_q is None:
            lse = torch.empty(
                q.shape[0], q.shape[2], q.shape[1], device=q.device, dtype=torch.float32
            )  # (B, H, Sq)
        else:
            lse = torch.empty(
                q.shape[1], q.shape[0], device=q.device, dtype=torch.float32
            )  # (H, total_q)
        opts = dict(softmax_scale=scale, window=window, softcap=softcap)
        varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
        fwd.launch_fwd(q, k, v, out, lse, **opts, **varlen)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.opts, ctx.varlen = opts, (max_q, max_k)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        _, _, bwd = _kernels()
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if dout.stride(-1) != 1 or 0 in dout.stride():
            dout = dout.contiguous()  # kernels need a dense last dim
        dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
        max_q, max_k = ctx.varlen
        bwd.launch_bwd(
            dout, q, k, v, out, lse, dq, dk, dv, **ctx.opts,
            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with the FlashAttention-2 algorithm (Triton), differentiable.

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0 (GQA/MQA). float16 or
            bfloat16 on CUDA (float32 works, slower); CPU tensors only under TRITON_INTERPRET=1.
            The last dim must be contiguous; other strides are free.
            D in [1, 256] (non powers of two are padded inside the kernel).
        causal: mask keys after the query; aligned bottom-right when Sq != Sk (query i sits at
            key position i + Sk - Sq, as flash-attn >= 2.1).
        softmax_scale: defaults to 1 / sqrt(D).
        window_size: (left, right) keys visible around the aligned diagonal; -1 is unbounded.
        softcap: if > 0, scores become softcap * tanh(scores / softcap) (Gemma 2).
        return_lse: also return the fp32 log-sum-exp (B, H, Sq) of the scaled scores.

    Rows with no visible key output 0 (LSE -inf). The backward is deterministic. Without
    autograd, Sq <= 16 against Sk >= 128 keys runs the split-K decoding kernel.

    Returns:
        out (B, Sq, H, D) in q's dtype, and lse when ``return_lse``.

    Raises:
        TypeError, ValueError: naming the offending argument (dtype, shape, device, stride).

    Example:
        >>> q = torch.randn(2, 1024, 32, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = v = torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
        >>> out = flash_attn_func(q, k, v, causal=True)  # (2, 1024, 32, 128)
    """
    common, _, _ = _kernels()
    for name, t in (("q", q), ("k", k), ("v", v)):
        common.check_tensor(name, t, 4)
    common.check_qkv(q, k, v, seq_dim=1)
    scale, window, cap = _check_options(causal, softmax_scale, window_size, softcap, q.shape[-1])
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not needs_grad and _is_decode(q, k):
        from llamazh.kernels.flash_decode import launch_decode

        out = q.new_empty(q.shape)  # contiguous (B, Sq, H, D) whatever the strides of q
        lse = torch.empty(
            q.shape[0], q.shape[2], q.shape[1], device=q.device, dtype=torch.float32
        )  # (B, H, Sq)
        launch_decode(q, k, v, out, lse, softmax_scale=scale, window=window, softcap=cap)
    else:
        out, lse = _FlashAttnFn.apply(q, k, v, scale, window, cap, None, None, 0, 0)
    return (out, lse) if return_lse else out


def _is_decode(q: torch.Tensor, k: torch.Tensor) -> bool:
    # few query rows per kv head against a long cache: split the keys across programs
    sq, h, sk, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    return (
        1 <= sq <= DECODE_MAX_SEQLEN_Q
        and (h // hkv) * sq <= DECODE_MAX_ROWS
        and sk >= DECODE_MIN_SEQLEN_K
        and q.shape[0] > 0
    )


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`flash_attn_func` on packed sequences (no attention across sequence boundaries).

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D): sequences concatenated along dim 0.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths starting at 0, on q's
            device; sequence b is ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]``.
        max_seqlen_q, max_seqlen_k: upper bounds of the per-sequence lengths (they size the
            grid; as in flash-attn they are trusted, not checked against cu_seqlens, which
            would cost a device sync).
        causal, softmax_scale, window_size, softcap: as :func:`flash_attn_func`, per sequence.
        return_lse: also return the fp32 LSE, (H, total_q).

    Returns:
        out (total_q, H, D), and lse when ``return_lse``.

    Example:
        >>> cu = torch.tensor([0, 3, 10], dtype=torch.int32, device="cuda")
        >>> q = k = v = torch.randn(10, 8, 64, device="cuda", dtype=torch.float16)
        >>> out = flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)
    """
    common, _, _ = _kernels()
    for name, t in (("q", q), ("k", k), ("v", v)):
        common.check_tensor(name, t, 3)
    common.check_qkv(q, k, v, seq_dim=0)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.ndim != 1:
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu)
            raise TypeError(f"{name} must be a 1-D int32 tensor, got {got}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
        if cu.numel() < 1:
            raise ValueError(f"{name} needs at least one entry (0), got an empty tensor")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    check_positive_int("max_seqlen_q", max_seqlen_q, minimum=0)
    check_positive_int("max_seqlen_k", max_seqlen_k, minimum=0)
    scale, window, cap = _check_options(causal, softmax_scale, window_size, softcap, q.shape[-1])
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    out, lse = _FlashAttnFn.apply(
        q, k, v, scale, window, cap, cu_q, cu_k, max_seqlen_q, max_seqlen_k
    )
    return (out, lse) if return_lse else out
