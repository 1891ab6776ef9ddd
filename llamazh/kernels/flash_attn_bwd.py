"""FlashAttention-2 backward in Triton, deterministic by construction (no atomics).

Two kernels recompute the probabilities from the saved LSE (Dao, arXiv:2307.08691, alg. 2):
``_attn_bwd_dkdv_kernel`` owns a block of keys of one key/value head and loops over every query
head of its GQA group and every query block that sees it, so dK/dV are summed in a fixed order
in registers; ``_attn_bwd_dq_kernel`` owns a block of queries and loops over keys. The row sums
``delta_i = dO_i . O_i`` come from a small preprocessing kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamazh.kernels.flash_attn_common import (
    LOG2E,
    LOG2E_C,
    _key_ranges,
    _query_ranges,
    _sequence_bounds,
    _tanh,
    _window_mask,
    block_d,
    interpreter_on,
)
from llamazh.kernels.flash_attn_fwd import (
    INTERPRETER_BLOCK,
    TUNE_KEY,
    TUNE_MIN_SEQLEN,
    make_configs,
    precision,
    tile_pruner,
)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, stride_or, stride_oh, stride_dr, stride_dh, stride_lb, stride_lh, seqlen,
    n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # grid: (cdiv(rows, BLOCK_R), H); rows = flattened (B, S) or packed tokens.
    # Math: delta[b, h, i] = sum_d dO[r, h, d] * O[r, h, d] in fp32 (r = b * seqlen + i),
    # stored in the LSE's layout: (B, H, S) or packed (H, total).
    pid_r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + offs_r[:, None] * stride_or + h * stride_oh + offs_d[None, :], mask=mask)
    do = tl.load(DO + offs_r[:, None] * stride_dr + h * stride_dh + offs_d[None, :], mask=mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    ptr = DELTA + (offs_r // seqlen) * stride_lb + h * stride_lh + offs_r % seqlen
    tl.store(ptr, delta, mask=offs_r < n_rows)


@triton.jit
def _scores(q, k, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    # log2-domain scores of a (M, N) tile and, with softcap, the tanh needed for its derivative
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if HAS_SOFTCAP:
        t = _tanh(qk * qk_scale)
        return softcap * t * LOG2E_C, t
    return qk * qk_scale, qk


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, H, HKV, GROUP, wl, wr, qk_scale, softcap, sm_scale, tune_q, tune_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (cdiv(max Sk, BLOCK_N), B * Hkv). Program (n, bk) owns keys [n * BLOCK_N, ...) of
    # batch b / kv head hk and sums over query heads hk * GROUP .. + GROUP - 1 in order.
    # Layouts as the forward; dk/dv like k/v. Math (P = exp(S - lse), dS = P * (dP - delta)):
    # dV = sum P^T dO, dK = scale * sum dS^T Q (times 1 - tanh^2 with softcap).
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bk = tl.program_id(1).to(tl.int64)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    q_start, k_start, seqlen_q, seqlen_k = _sequence_bounds(
        CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN
    )
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    off = seqlen_k - seqlen_q
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k_base = K + b * stride_kb + k_start * stride_ks + hk * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vs + hk * stride_vh
    k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, fs, fe, hi = _query_ranges(
        n0, seqlen_q, seqlen_k, off, wl, wr, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    d_ok = offs_d[None, :] < HEAD_DIM
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + q_start * stride_qs + h * stride_qh
        do_base = DO + b * stride_dob + q_start * stride_dos + h * stride_doh
        row_base = b * stride_lb + h * stride_lh + q_start
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            masked = (m0 < fs) | (m0 >= fe)
            row_ok = offs_m < seqlen_q
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok, other=0.0)  # fmt: skip
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :],
                         mask=row_ok[:, None] & d_ok, other=0.0)  # fmt: skip
            lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * LOG2E_C
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: P = 0
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
            s, t = _scores(q, k, qk_scale, softcap, HAS_SOFTCAP, PRECISION)  # (M, N)
            p = tl.exp2(s - lse[:, None])
            if masked:
                valid = _window_mask(offs_m, offs_n, off, seqlen_q, seqlen_k, wl, wr,
                                     HAS_LEFT, HAS_RIGHT)  # fmt: skip
                p = tl.where(valid, p, 0.0)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    dk_base = DK + b * stride_dkb + k_start * stride_dks + hk * stride_dkh
    dv_base = DV + b * stride_dvb + k_start * stride_dvs + hk * stride_dvh
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)  # fmt: skip
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok)  # fmt: skip


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, H, GROUP, wl, wr, qk_scale, softcap, sm_scale, tune_q, tune_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (cdiv(max Sq, BLOCK_M), B * H). Program (m, bh) owns query rows [m * BLOCK_M, ...)
    # of batch b / head h and loops over the key blocks they see (the forward's ranges).
    # Math: dQ = scale * sum_j dS K (times 1 - tanh^2 with softcap), dS = P * (dP - delta).
    pid_m = tl.program_id(0).to(tl.int64)
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
    row_ok = offs_m < seqlen_q
    d_ok = offs_d[None, :] < HEAD_DIM
    q_ok = row_ok[:, None] & d_ok
    q_base = Q + b * stride_qb + q_start * stride_qs + h * stride_qh
    do_base = DO + b * stride_dob + q_start * stride_dos + h * stride_doh
    k_base = K + b * stride_kb + k_start * stride_ks + hk * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vs + hk * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_ok, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=q_ok, other=0.0)
    row_base = b * stride_lb + h * stride_lh + q_start
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * LOG2E_C
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, fs, fe, hi = _key_ranges(
        m0, seqlen_q, seqlen_k, off, wl, wr, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        masked = (n0 < fs) | (n0 >= fe)
        kv_ok = (offs_n[:, None] < seqlen_k) & d_ok
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0)
        s, t = _scores(q, k, qk_scale, softcap, HAS_SOFTCAP, PRECISION)
        p = tl.exp2(s - lse[:, None])
        if masked:
            valid = _window_mask(offs_m, offs_n, off, seqlen_q, seqlen_k, wl, wr,
                                 HAS_LEFT, HAS_RIGHT)  # fmt: skip
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    dq_base = DQ + b * stride_dqb + q_start * stride_dqs + h * stride_dqh
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok)  # fmt: skip


# dK/dV hold two fp32 (BLOCK_N, D) accumulators, dQ one (BLOCK_M, D): long key tiles for the
# first, long query tiles for the second (as in Triton's fused-attention tutorial)
_dkdv_tuned = triton.autotune(
    configs=make_configs(
        [
            (32, 128, 8, 3),
            (64, 128, 8, 3),
            (32, 128, 4, 3),
            (64, 64, 4, 3),
            (32, 64, 4, 3),
            (16, 64, 4, 2),
        ]
    ),
    key=TUNE_KEY,
    prune_configs_by={"early_config_prune": tile_pruner("BLOCK_N", 128 * 128)},
)(_attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(
    configs=make_configs(
        [
            (128, 32, 8, 3),
            (128, 64, 8, 3),
            (128, 32, 4, 3),
            (64, 64, 4, 3),
            (64, 32, 4, 3),
            (64, 16, 4, 2),
        ]
    ),
    key=TUNE_KEY,
    prune_configs_by={"early_config_prune": tile_pruner("BLOCK_M", 128 * 128)},
)(_attn_bwd_dq_kernel)


def _bwd_fixed(head_dim_padded: int) -> tuple[dict, dict]:
    if head_dim_padded > 128:
        return (dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
                dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2))  # fmt: skip
    return (dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3))  # fmt: skip


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    # (b, s, h) strides of a dense (B, S, H, D) tensor, or (0, s, h) of a packed (T, H, D) one
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def launch_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    *,
    softmax_scale: float,
    window: tuple[int, int],
    softcap: float,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> None:
    """Fill dq, dk, dv (same shapes and layouts as q, k, v) from the forward's out and lse."""
    varlen = cu_seqlens_q is not None
    heads, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if varlen:
        batch, sq, sk = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
        stride_lb, stride_lh = 0, lse.stride(0)
    else:
        batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        cu_q = cu_k = lse
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
    if batch == 0 or sk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return
    delta = torch.empty_like(lse)  # same layout as the LSE
    rows = out.shape[0] * (1 if varlen else out.shape[1])
    o_r, d_r = out.reshape(rows, heads, d), do.reshape(rows, heads, d)  # (rows, H, D)
    bd = block_d(d)
    block_r = 16 if interpreter_on() else 64
    _attn_bwd_delta_kernel[(triton.cdiv(rows, block_r), heads)](
        o_r, d_r, delta, o_r.stride(0), o_r.stride(1), d_r.stride(0), d_r.stride(1),
        stride_lb, stride_lh, rows if varlen else sq, rows,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_R=block_r,
    )  # fmt: skip
    left, right = window
    if softcap > 0:
        qk_scale, cap = softmax_scale / softcap, softcap
        sm_scale = softmax_scale  # d(cap * tanh(x * scale / cap)) = scale * (1 - tanh^2)
    else:
        qk_scale, cap, sm_scale = softmax_scale * LOG2E, 0.0, softmax_scale
    tune = (triton.next_power_of_2(sq), triton.next_power_of_2(sk))
    meta = dict(
        HEAD_DIM=d,
        BLOCK_D=bd,
        HAS_LEFT=left >= 0,
        HAS_RIGHT=right >= 0,
        HAS_SOFTCAP=softcap > 0,
        VARLEN=varlen,
        PRECISION=precision(q.dtype),
    )
    common = (left, right, qk_scale, cap, sm_scale, *tune)
    dkdv_args = (
        q, k, v, do, dk, dv, lse, delta, cu_q, cu_k,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen),
        *_strides3(do, varlen), *_strides3(dk, varlen), *_strides3(dv, varlen),
        stride_lb, stride_lh, sq, sk, heads, hkv, heads // hkv, *common,
    )  # fmt: skip
    dq_args = (
        q, k, v, do, dq, lse, delta, cu_q, cu_k,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen),
        *_strides3(do, varlen), *_strides3(dq, varlen),
        stride_lb, stride_lh, sq, sk, heads, heads // hkv, *common,
    )  # fmt: skip
    if interpreter_on():
        blk = dict(BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK)
        _attn_bwd_dkdv_kernel[(triton.cdiv(sk, INTERPRETER_BLOCK), batch * hkv)](
            *dkdv_args, **blk, **meta
        )
        _attn_bwd_dq_kernel[(triton.cdiv(sq, INTERPRETER_BLOCK), batch * heads)](
            *dq_args, **blk, **meta
        )
        return
    if max(sq, sk) < TUNE_MIN_SEQLEN:
        c1, c2 = _bwd_fixed(bd)
        _attn_bwd_dkdv_kernel[(triton.cdiv(sk, c1["BLOCK_N"]), batch * hkv)](
            *dkdv_args, **c1, **meta
        )
        _attn_bwd_dq_kernel[(triton.cdiv(sq, c2["BLOCK_M"]), batch * heads)](*dq_args, **c2, **meta)
        return
    _dkdv_tuned[lambda m: (triton.cdiv(sk, m["BLOCK_N"]), batch * hkv)](*dkdv_args, **meta)
    _dq_tuned[lambda m: (triton.cdiv(sq, m["BLOCK_M"]), batch * heads)](*dq_args, **meta)
