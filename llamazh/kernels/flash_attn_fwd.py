"""FlashAttention-2 forward in Triton: dense (B, S, H, D) and packed varlen (total, H, D).

Algorithm: Dao, "FlashAttention-2" (arXiv:2307.08691), section 3.1: one program per block of
query rows keeps a running max ``m``, a running sum ``l`` and an unnormalised accumulator; keys
stream through in blocks, nothing of size Sq x Sk is stored; ``LSE = m + log(l)`` is saved for
the backward. Masks and conventions: see ``flash_attn_common``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llamazh.kernels.flash_attn_common import (
    LN2_C,
    LOG2E,
    LOG2E_C,
    _key_ranges,
    _sequence_bounds,
    _tanh,
    _window_mask,
    block_d,
    interpreter_on,
)


@triton.jit
def _load_tile(ptrs, offs_rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):  # fmt: skip
    # (rows, BLOCK_D) tile; masks only where rows may run past n_rows or D was padded
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=offs_rows[:, None] < n_rows, other=0.0)
        else:
            mask = (offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
            tile = tl.load(ptrs, mask=mask, other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, start, end,
    off, seqlen_q, seqlen_k, wl, wr, qk_scale, softcap,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_ptr = k_base + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptr = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]
        # interior blocks of a power-of-two head dim load without any mask (vectorised)
        k = _load_tile(k_ptr, offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_ptr, offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HAS_SOFTCAP:
            s = softcap * _tanh(qk * qk_scale) * LOG2E_C  # qk_scale = scale / softcap here
        else:
            s = qk * qk_scale  # qk_scale = scale * log2(e)
        if MASKED:
            valid = _window_mask(
                offs_m, offs_n, off, seqlen_q, seqlen_k, wl, wr, HAS_LEFT, HAS_RIGHT
            )
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen only masked keys keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, H, GROUP, wl, wr, qk_scale, softcap, tune_q, tune_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (cdiv(max Sq, BLOCK_M), B * H). Program (m, bh) owns query rows
    # [m * BLOCK_M, (m + 1) * BLOCK_M) of batch b / head h, reading key/value head h // GROUP.
    # Layouts: q, o (B, Sq, H, D) or packed (total_q, H, D) with stride_qb = 0 and rows offset
    # by cu_seqlens_q[b]; LSE fp32 (B, H, Sq) or (H, total_q). Head dim padded to BLOCK_D.
    # Math: o_i = sum_j softmax_j(scale * q_i . k_j [softcapped, masked]) v_j; lse_i saved.
    # heaviest query blocks first (under a causal mask the last rows see the most keys), so
    # the final wave of programs is short
    pid_m = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, k_start, seqlen_q, seqlen_k = _sequence_bounds(
        CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN
    )
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + q_start * stride_qs + h * stride_qh
    k_base = K + b * stride_kb + k_start * stride_ks + hk * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vs + hk * stride_vh
    row_ok = offs_m[:, None] < seqlen_q
    d_ok = offs_d[None, :] < HEAD_DIM
    q = _load_tile(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, seqlen_q,
                   offs_d, HEAD_DIM, BLOCK_D, True)  # fmt: skip

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, fs, fe, hi = _key_ranges(
        m0, seqlen_q, seqlen_k, off, wl, wr, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    # masked blocks first (left edge of a window), then the interior, then the diagonal edge
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, lo, fs,
        off, seqlen_q, seqlen_k, wl, wr, qk_scale, softcap,
        BLOCK_N, BLOCK_D, HEAD_DIM, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, fs, fe,
        off, seqlen_q, seqlen_k, wl, wr, qk_scale, softcap,
        BLOCK_N, BLOCK_D, HEAD_DIM, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, fe, hi,
        off, seqlen_q, seqlen_k, wl, wr, qk_scale, softcap,
        BLOCK_N, BLOCK_D, HEAD_DIM, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, PRECISION,
    )  # fmt: skip

    empty = l_i == 0.0  # nothing to attend to: output 0 and LSE -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2_C)
    o_base = O + b * stride_ob + q_start * stride_os + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok & d_ok)  # fmt: skip
    lse_ptr = LSE + b * stride_lb + h * stride_lh + q_start + offs_m
    tl.store(lse_ptr, lse, mask=offs_m < seqlen_q)


def make_configs(pairs) -> list[triton.Config]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuples -> autotune configs."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in pairs
    ]


# environment variable: tune over at most this many configs (the first ones left after the
# head-dim pruning, in list order); unset or 0 means all. Bounds compile + tuning time where a
# run cannot afford it (benchmarks/gpu_suite.py sets 2); read each time a new shape is tuned.
TUNE_CONFIGS_ENV = "LLAMAZH_TUNE_CONFIGS"


def tune_cap() -> int:
    """How many configs one autotuning may try (``LLAMAZH_TUNE_CONFIGS``; 0 = no cap)."""
    raw = os.environ.get(TUNE_CONFIGS_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise ValueError(f"{TUNE_CONFIGS_ENV} must be a non-negative integer, got {raw!r}")
    return int(raw)


def tile_pruner(rows: str, limit: int):
    """Drop configs whose ``rows`` block times the padded head dim exceeds ``limit`` elements
    (fp32 accumulators that would spill registers); always keep the smallest config. Then keep
    at most :func:`tune_cap` of them."""

    def prune(configs, named_args, **kwargs):
        d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
        keep = [c for c in configs if c.kwargs[rows] * d <= limit]
        keep = keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        cap = tune_cap()
        return keep[:cap] if cap else keep

    return prune


TUNE_KEY = ["tune_q", "tune_k", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "VARLEN"]
# Hopper and Ampere: 128-row query tiles with 8 warps win from 2k tokens on; smaller tiles
# for short sequences and head dims above 128.
_attn_fwd_tuned = triton.autotune(
    configs=make_configs(
        [
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (128, 64, 4, 3),
            (128, 32, 4, 4),
            (64, 64, 4, 3),
            (64, 32, 4, 3),
            (32, 32, 4, 2),
        ]
    ),
    key=TUNE_KEY,
    prune_configs_by={"early_config_prune": tile_pruner("BLOCK_M", 128 * 128)},
)(_attn_fwd_kernel)

INTERPRETER_BLOCK = 16
# below this many keys autotuning costs more than it saves: one fixed config per shape family
TUNE_MIN_SEQLEN = 1024


def fixed_config(head_dim_padded: int) -> dict:
    """The launch config used for short sequences (and the template of the tuned ones)."""
    if head_dim_padded > 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dot products (not TF32), half types use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float,
    window: tuple[int, int],
    softcap: float,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> None:
    """Launch the forward on checked inputs (see ``llamazh.attention`` for the public API).

    Dense: q/out (B, Sq, H, D), k/v (B, Sk, Hkv, D), lse fp32 (B, H, Sq) contiguous.
    Varlen (``cu_seqlens_q`` given): q/out (total_q, H, D), k/v (total_k, Hkv, D), lse (H, total_q).
    ``window`` already has causal folded in (``mask_params``); ``softcap`` 0 disables it.
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        q4, k4, v4, o4 = (t.unsqueeze(0) for t in (q, k, v, out))  # (1, total, H, D)
        sq, sk = max_seqlen_q, max_seqlen_k
        stride_lb, stride_lh = 0, lse.stride(0)
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch = q.shape[0]
        q4, k4, v4, o4 = q, k, v, out
        sq, sk = q.shape[1], k.shape[1]
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
        cu_q = cu_k = lse  # unused placeholders
    heads, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if sq == 0 or batch == 0:
        return
    left, right = window
    if softcap > 0:
        qk_scale, cap = softmax_scale / softcap, softcap
    else:
        qk_scale, cap = softmax_scale * LOG2E, 0.0
    sb = 0 if varlen else None
    args = (
        q, k, v, out, lse, cu_q, cu_k,
        q4.stride(0) if sb is None else 0, q4.stride(1), q4.stride(2),
        k4.stride(0) if sb is None else 0, k4.stride(1), k4.stride(2),
        v4.stride(0) if sb is None else 0, v4.stride(1), v4.stride(2),
        o4.stride(0) if sb is None else 0, o4.stride(1), o4.stride(2),
        stride_lb, stride_lh,
        sq, sk, heads, heads // hkv, left, right, qk_scale, cap,
        triton.next_power_of_2(sq), triton.next_power_of_2(sk),
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=d,
        BLOCK_D=block_d(d),
        HAS_LEFT=left >= 0,
        HAS_RIGHT=right >= 0,
        HAS_SOFTCAP=softcap > 0,
        VARLEN=varlen,
        PRECISION=precision(q.dtype),
    )
    if interpreter_on():
        grid = (triton.cdiv(sq, INTERPRETER_BLOCK), batch * heads)
        _attn_fwd_kernel[grid](*args, BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK, **meta)
    elif max(sq, sk) < TUNE_MIN_SEQLEN:
        cfg = fixed_config(meta["BLOCK_D"])
        _attn_fwd_kernel[(triton.cdiv(sq, cfg["BLOCK_M"]), batch * heads)](*args, **cfg, **meta)
    else:

        def grid(m):
            return (triton.cdiv(sq, m["BLOCK_M"]), batch * heads)

        _attn_fwd_tuned[grid](*args, **meta)
