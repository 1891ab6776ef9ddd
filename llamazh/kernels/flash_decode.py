"""Split-K attention for decoding: a few queries (Sq = 1..16) against a long key/value cache.

With Sq this small the dense forward launches B * H * 1 programs and leaves most of the GPU
idle while one program streams the whole cache. Here the keys are split into chunks across
programs (flash-decoding): each program attends one kv head's whole GQA group of queries
(GROUP * Sq rows, so K/V are read once per group) to one chunk and writes a partial output with
its LSE; a reduce kernel merges the chunks with the usual log-sum-exp weights. Forward only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamazh.kernels.flash_attn_common import (
    LN2_C,
    LOG2E,
    LOG2E_C,
    _tanh,
    _window_mask,
    block_d,
    interpreter_on,
)
from llamazh.kernels.flash_attn_fwd import precision


@triton.jit
def _decode_split_kernel(
    Q, K, V, OP, LP, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, seqlen_q, seqlen_k, HKV, GROUP, n_splits, chunk, k_lo, k_hi,
    wl, wr, qk_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (n_splits, B * Hkv). Program (s, bk) owns keys [k_lo + s * chunk, ...) of batch b /
    # kv head hk and every query row r = g * Sq + i (head hk * GROUP + g, query i) of its group.
    # Layouts: q (B, Sq, H, D), k/v (B, Sk, Hkv, D); partials OP fp32 (B * Hkv, splits, BLOCK_M,
    # BLOCK_D), LP fp32 (B * Hkv, splits, BLOCK_M). Math: the forward's online softmax on a chunk.
    pid_s = tl.program_id(0).to(tl.int64)
    pid_bk = tl.program_id(1).to(tl.int64)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    offs_r = tl.arange(0, BLOCK_M)
    g = offs_r // seqlen_q
    offs_i = offs_r % seqlen_q  # query index within the sequence, drives the mask
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < GROUP * seqlen_q
    d_ok = offs_d[None, :] < HEAD_DIM
    q_ptr = Q + b * stride_qb + offs_i[:, None] * stride_qs + (hk * GROUP + g)[:, None] * stride_qh
    q = tl.load(q_ptr + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    off = seqlen_k - seqlen_q
    start = k_lo + pid_s * chunk
    end = tl.minimum(start + chunk, k_hi)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < end) & d_ok
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HAS_SOFTCAP:
            s = softcap * _tanh(qk * qk_scale) * LOG2E_C
        else:
            s = qk * qk_scale
        valid = _window_mask(offs_i, offs_n, off, seqlen_q, end, wl, wr, HAS_LEFT, HAS_RIGHT)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    part = (pid_bk * n_splits + pid_s) * BLOCK_M
    tl.store(OP + (part + offs_r)[:, None] * BLOCK_D + offs_d[None, :], out)
    tl.store(LP + part + offs_r, lse2)


@triton.jit
def _decode_reduce_kernel(
    OP, LP, O, LSE, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, HKV, GROUP, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # grid: (GROUP * Sq, B * Hkv). Program (r, bk) merges row r of all splits of (b, hk):
    # o = sum_s exp(lse_s - lse) o_s with lse = log sum_s exp(lse_s); empty rows -> 0, -inf.
    r = tl.program_id(0).to(tl.int64)
    pid_bk = tl.program_id(1).to(tl.int64)
    b = pid_bk // HKV
    h = (pid_bk % HKV) * GROUP + r // seqlen_q
    i = r % seqlen_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    rows = (pid_bk * n_splits + offs_s) * BLOCK_M + r
    lse2 = tl.load(LP + rows, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse2 - m_safe)
    total = tl.sum(w, 0)
    parts = tl.load(OP + rows[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    empty = total == 0.0
    out = tl.sum(parts * w[:, None], 0) / tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(tl.where(empty, 1.0, total))) * LN2_C)
    o_ptr = O + b * stride_ob + i * stride_os + h * stride_oh + offs_d
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(LSE + b * stride_lb + h * stride_lh + i, lse)


def decode_rows(num_q_heads: int, num_kv_heads: int, seqlen_q: int) -> int:
    """Rows one decode program holds: the GQA group times the query length."""
    return (num_q_heads // num_kv_heads) * seqlen_q


def launch_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float,
    window: tuple[int, int],
    softcap: float,
    num_splits: int | None = None,
) -> None:
    """Split-K forward on checked dense inputs: q/out (B, Sq, H, D), k/v (B, Sk, Hkv, D),
    lse fp32 (B, H, Sq). Meant for ``decode_rows(H, Hkv, Sq) <= 128``."""
    batch, sq, heads, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = heads // hkv
    left, right = window
    # only keys some query can see: rows sit at key positions Sk - Sq .. Sk - 1
    k_lo = max(0, sk - sq - left) if left >= 0 else 0
    k_hi = min(sk, sk + right) if right >= 0 else sk
    k_hi = max(k_hi, k_lo)
    interp = interpreter_on()
    block_n = 16 if interp else 64
    block_m = max(16, triton.next_power_of_2(group * sq))
    bd = block_d(d)
    n_blocks = max(1, triton.cdiv(k_hi - k_lo, block_n))
    if num_splits is None:
        sms = 4 if interp else torch.cuda.get_device_properties(q.device).multi_processor_count
        num_splits = max(1, min(n_blocks, triton.cdiv(2 * sms, batch * hkv), 128))
    chunk = triton.cdiv(n_blocks, num_splits) * block_n
    num_splits = max(1, triton.cdiv(k_hi - k_lo, chunk))
    op = torch.empty(batch * hkv, num_splits, block_m, bd, device=q.device, dtype=torch.float32)
    lp = torch.empty(batch * hkv, num_splits, block_m, device=q.device, dtype=torch.float32)
    if softcap > 0:
        qk_scale, cap = softmax_scale / softcap, softcap
    else:
        qk_scale, cap = softmax_scale * LOG2E, 0.0
    warps = {} if interp else {"num_warps": 4, "num_stages": 3}
    _decode_split_kernel[(num_splits, batch * hkv)](
        q, k, v, op, lp, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), sq, sk, hkv, group, num_splits,
        chunk, k_lo, k_hi, left, right, qk_scale, cap,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=block_n, HAS_LEFT=left >= 0,
        HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0, PRECISION=precision(q.dtype), **warps,
    )  # fmt: skip
    _decode_reduce_kernel[(group * sq, batch * hkv)](
        op, lp, out, lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0),
        lse.stride(1), sq, hkv, group, num_splits,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
    )  # fmt: skip
