"""Fused rotary embedding: one launch rotates q and k (and copies the unrotated tail).

``_rope_fwd_kernel`` -> ``rope_fwd`` (this file) -> ``llamazh.rope.apply._RotaryFn`` ->
``apply_rotary`` -> ``RotaryEmbedding``. The backward pass is this same kernel with sin negated
(a rotation's transpose is the rotation by the opposite angle).

Imports torch and triton only.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["rope_fwd"]


@triton.jit
def _rotate_heads(
    X, OUT, x_base, o_base, h0, H, stride_xh, stride_oh, c, s,
    offs_i, mask_i, offs_t, mask_t,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
    COPY_TAIL: tl.constexpr,
):  # fmt: skip
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    mask = mask_h[:, None] & mask_i[None, :]
    if INTERLEAVED:  # pairs (2i, 2i + 1)
        idx1 = 2 * offs_i
        idx2 = 2 * offs_i + 1
    else:  # rotate-half pairs (i, i + R/2)
        idx1 = offs_i
        idx2 = offs_i + HALF
    x_rows = X + x_base + offs_h[:, None].to(tl.int64) * stride_xh
    o_rows = OUT + o_base + offs_h[:, None].to(tl.int64) * stride_oh
    x1 = tl.load(x_rows + idx1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + idx2[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c[None, :] - x2 * s[None, :]
    o2 = x2 * c[None, :] + x1 * s[None, :]
    tl.store(o_rows + idx1[None, :], o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_rows + idx2[None, :], o2.to(OUT.dtype.element_ty), mask=mask)
    if COPY_TAIL:  # out-of-place with rotary_dim < head_dim: the rest passes through
        tail_mask = mask_h[:, None] & mask_t[None, :]
        tail = tl.load(x_rows + offs_t[None, :], mask=tail_mask, other=0.0)
        tl.store(o_rows + offs_t[None, :], tail, mask=tail_mask)


@triton.jit
def _rope_fwd_kernel(
    Q, K, QO, KO, COS, SIN, POS,
    S, HQ, HK, NQ_BLOCKS, R, D,
    sqb, sqs, sqh, skb, sks, skh,
    sqob, sqos, sqoh, skob, skos, skoh,
    scb, scs, ssb, sss, spb, sps,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, HAS_POS: tl.constexpr, CONJ: tl.constexpr,
    INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr,
):  # fmt: skip
    # grid (B * S, cdiv(HQ, BLOCK_H) + cdiv(HK, BLOCK_H)): program (t, j) owns token t = b*S + s
    # and BLOCK_H heads of q (j < NQ_BLOCKS) or of k. All tensors are addressed as logical
    # (B, S, H, D) through their strides (head dim contiguous), so (B, H, S, D) is the same
    # kernel with other strides. Math, per pair (x1, x2) and angle a = pos * inv_freq:
    #   (x1, x2) -> (x1 cos a - x2 sin a, x2 cos a + x1 sin a), fp32, one rounding at the store.
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    b = t // S
    s_idx = t % S
    if HAS_POS:
        row = tl.load(POS + b * spb + s_idx * sps).to(tl.int64)
    else:
        row = s_idx
    offs_i = tl.arange(0, HALF_PAD)
    mask_i = offs_i < HALF
    c = tl.load(COS + b * scb + row * scs + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    sn = tl.load(SIN + b * ssb + row * sss + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    if CONJ:
        sn = -sn
    offs_t = R + tl.arange(0, TAIL_PAD)
    mask_t = offs_t < D
    if j < NQ_BLOCKS:
        _rotate_heads(
            Q, QO, b * sqb + s_idx * sqs, b * sqob + s_idx * sqos, j * BLOCK_H, HQ, sqh, sqoh,
            c, sn, offs_i, mask_i, offs_t, mask_t, HALF, BLOCK_H, INTERLEAVED, COPY_TAIL,
        )  # fmt: skip
    else:
        _rotate_heads(
            K, KO, b * skb + s_idx * sks, b * skob + s_idx * skos, (j - NQ_BLOCKS) * BLOCK_H,
            HK, skh, skoh, c, sn, offs_i, mask_i, offs_t, mask_t, HALF, BLOCK_H, INTERLEAVED,
            COPY_TAIL,
        )  # fmt: skip


def _check_4d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, S, H, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be fp16, bf16 or fp32, got dtype {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")


def rope_fwd(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor | None,
    *,
    position_ids: torch.Tensor | None = None,
    rotary_dim: int,
    interleaved: bool = False,
    conjugate: bool = False,
    check_positions: bool = True,
) -> None:
    """Write the rotated q (and k) into ``q_out`` (and ``k_out``), which may alias the inputs.

    Args:
        q: ``(B, S, Hq, D)`` fp16/bf16/fp32, any strides with the last one 1.
        k: ``(B, S, Hk, D)`` same dtype and device, or ``None``.
        cos, sin: ``(Bc, P, R/2)`` any float dtype (fp32 recommended), ``Bc`` in ``{1, B}``;
            row ``s`` (or ``position_ids[b, s]``) is used for token ``(b, s)``.
        q_out, k_out: outputs shaped like ``q``/``k`` (last stride 1); when they are not the
            inputs and ``rotary_dim < D`` the tail ``[..., R:]`` is copied.
        position_ids: ``(B, S)`` integer rows into cos/sin, or ``None`` (row = s).
        rotary_dim: ``R``, even, ``<= D``.
        interleaved: pairs ``(2i, 2i+1)`` (GPT-J) instead of ``(i, i + R/2)`` (GPT-NeoX/Llama).
        conjugate: rotate by ``-angle`` (the backward pass).
        check_positions: verify ``0 <= position_ids < P`` (one device sync).

    Raises:
        TypeError / ValueError: on any shape, dtype, device or stride mismatch, or positions out
            of range; CPU tensors without ``TRITON_INTERPRET=1``.
    """
    _check_4d("q", q)
    _check_4d("q_out", q_out)
    B, S, HQ, D = q.shape
    if q_out.shape != q.shape or q_out.dtype != q.dtype:
        raise ValueError(f"q_out must match q {tuple(q.shape)} {q.dtype}, got {q_out.shape}")
    tensors = [q, q_out, cos, sin]
    if k is not None:
        _check_4d("k", k)
        if k_out is None:
            raise ValueError("k_out must be given with k")
        _check_4d("k_out", k_out)
        if k.shape[:2] != q.shape[:2] or k.shape[3] != D or k.dtype != q.dtype:
            raise ValueError(
                f"k must be (B, S, Hk, D) = ({B}, {S}, Hk, {D}) with dtype {q.dtype}, got "
                f"{tuple(k.shape)} {k.dtype}"
            )
        if k_out.shape != k.shape or k_out.dtype != k.dtype:
            raise ValueError(f"k_out must match k {tuple(k.shape)}, got {tuple(k_out.shape)}")
        tensors += [k, k_out]
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"rotary_dim must be an int, got {rotary_dim!r}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > D:
        raise ValueError(f"rotary_dim must be even and in [2, {D}], got rotary_dim={rotary_dim}")
    half = rotary_dim // 2
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 3 or table.shape[0] not in (1, B) or table.shape[2] != half:
            raise ValueError(
                f"{name} must be (1 or B={B}, P, R/2={half}), got shape {tuple(table.shape)}"
            )
        if not table.is_floating_point() or table.stride(-1) != 1:
            raise ValueError(f"{name} must be a float tensor with a contiguous last dim")
    P = cos.shape[1]
    if sin.shape != cos.shape:
        raise ValueError(f"sin {tuple(sin.shape)} must match cos {tuple(cos.shape)}")
    if position_ids is not None:
        tensors.append(position_ids)
        if position_ids.shape != (B, S) or position_ids.is_floating_point():
            raise ValueError(
                f"position_ids must be an integer (B, S) = ({B}, {S}) tensor, got "
                f"{tuple(position_ids.shape)} {position_ids.dtype}"
            )
        if check_positions and position_ids.numel():
            low, high = int(position_ids.min()), int(position_ids.max())
            if low < 0 or high >= P:
                raise ValueError(
                    f"position_ids must lie in [0, {P}) (the cos/sin rows), got [{low}, {high}]"
                )
    elif P < S:
        raise ValueError(f"cos/sin have {P} rows, fewer than the sequence length S={S}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = q.device
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "the Triton RoPE kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before Triton "
            "is imported, for CPU tests); use backend='torch' on the CPU"
        )
    if q.numel() == 0:
        return
    HK = k.shape[2] if k is not None else 0
    copy_tail = rotary_dim < D and (
        q_out.data_ptr() != q.data_ptr() or (k is not None and k_out.data_ptr() != k.data_ptr())
    )
    half_pad = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(HQ, HK, 1)), max(1, 2048 // half_pad))
    nq_blocks = triton.cdiv(HQ, block_h)
    grid = (B * S, nq_blocks + triton.cdiv(HK, block_h))
    kk, kko = (k, k_out) if k is not None else (q, q_out)  # unused pointers when HK == 0
    pos = position_ids if position_ids is not None else q  # dummy pointer when HAS_POS=False
    pos_strides = position_ids.stride() if position_ids is not None else (0, 0)
    cos_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    sin_b = 0 if sin.shape[0] == 1 else sin.stride(0)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _rope_fwd_kernel[grid](
            q, kk, q_out, kko, cos, sin, pos,
            S, HQ, HK, nq_blocks, rotary_dim, D,
            q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            kko.stride(0), kko.stride(1), kko.stride(2),
            cos_b, cos.stride(1), sin_b, sin.stride(1), pos_strides[0], pos_strides[1],
            HALF=half, HALF_PAD=half_pad,
            TAIL_PAD=triton.next_power_of_2(max(D - rotary_dim, 1)),
            BLOCK_H=block_h, HAS_POS=position_ids is not None, CONJ=conjugate,
            INTERLEAVED=interleaved, COPY_TAIL=copy_tail,
            num_warps=4,
        )  # fmt: skip
