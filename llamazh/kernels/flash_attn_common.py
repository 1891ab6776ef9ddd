"""Pieces shared by the FlashAttention-2 kernels: masks, block ranges, softcap, launch checks.

Masking convention (flash-attn >= 2.1): query row ``i`` of a sequence with ``Sq`` queries and
``Sk`` keys sits at key position ``i + Sk - Sq`` (bottom-right alignment). With
``window_size=(left, right)`` it may attend to key ``j`` iff
``i + off - left <= j <= i + off + right`` (``off = Sk - Sq``; a bound of -1 is unbounded);
causal attention is ``right = 0``. A row with no key to attend to outputs 0 and has LSE -inf.

Scores live in the log2 domain inside the kernels (``exp2`` is one instruction): the softmax
scale is folded with log2(e) once, and the LSE stored for users is converted back to natural log.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# the same numbers as compile-time constants, the only globals a @triton.jit function may read
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_on() -> bool:
    """Whether Triton runs kernels on the CPU (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16 for ``tl.dot``); the pad lanes are masked."""
    return max(16, triton.next_power_of_2(head_dim))


def check_tensor(name: str, t: object, ndim: int) -> torch.Tensor:
    """Type, rank, dtype, device and last-dim contiguity of one kernel input."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got {name}.shape={tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {name}.dtype={t.dtype}")
    if t.device.type != "cuda" and not interpreter_on():
        raise ValueError(
            f"{name} is on {t.device}; the Triton kernels need CUDA tensors "
            "(CPU tensors only under TRITON_INTERPRET=1); use llamazh.attention.attention(..., "
            "backend='sdpa') on other devices"
        )
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last (head) dim, got {name}.stride()={t.stride()}"
        )
    return t


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_dim: int) -> None:
    """Shared rules of q, k, v: dtypes, devices, head dims, GQA divisibility, matching lengths."""
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got q.shape[-1]={d}")
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(
            f"q, k, v must share the head dim, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    h, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (GQA), got H={h}, Hkv={hkv}"
        )
    if seq_dim == 1 and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")


def mask_params(causal: bool, window: tuple[int, int]) -> tuple[int, int]:
    """Fold ``causal`` into the window: causal is a right bound of 0."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


# ---- device helpers ---------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh from exp2 so the interpreter and every backend agree; saturates cleanly at +-1
    e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _window_mask(offs_m, offs_n, off, seqlen_q, seqlen_k, wl, wr, HAS_LEFT, HAS_RIGHT):
    # (BLOCK_M, BLOCK_N) validity: rows and columns in range, inside the window
    mask = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    if HAS_RIGHT:
        mask = mask & (offs_n[None, :] <= offs_m[:, None] + off + wr)
    if HAS_LEFT:
        mask = mask & (offs_n[None, :] >= offs_m[:, None] + off - wl)
    return mask


@triton.jit
def _sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN):
    # Where sequence b starts in the query/key rows and how long it is: dense inputs start at 0
    # with the given lengths; packed (varlen) inputs read both from cu_seqlens.
    q_start = b * 0
    k_start = b * 0
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
        seqlen_k = (tl.load(CU_K + b + 1) - k_start).to(tl.int32)
    return q_start, k_start, seqlen_q, seqlen_k


@triton.jit
def _key_ranges(m0, seqlen_q, seqlen_k, off, wl, wr, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT):
    # For query rows [m0, m0 + BLOCK_M): key blocks [lo, fs) and [fe, hi) need the mask,
    # [fs, fe) is fully visible to every row (no mask work); BLOCK_N-aligned except hi.
    m1 = tl.minimum(m0 + BLOCK_M, seqlen_q)
    lo = m0 * 0
    hi = m0 * 0 + seqlen_k
    fs = lo
    fe = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = tl.maximum(m0 + off - wl, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        fs = tl.maximum(m1 - 1 + off - wl, 0)
        fs = ((fs + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(m1 + off + wr, seqlen_k)
        fe = (tl.minimum(m0 + off + wr + 1, seqlen_k) // BLOCK_N) * BLOCK_N
    fs = tl.maximum(fs, lo)
    fe = tl.minimum(fe, hi)
    no_full = fs >= fe
    fs = tl.where(no_full, tl.maximum(hi, lo), fs)
    fe = tl.where(no_full, tl.maximum(hi, lo), fe)
    return lo, fs, fe, hi


@triton.jit
def _query_ranges(n0, seqlen_q, seqlen_k, off, wl, wr, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT):
    # The transpose of _key_ranges: for key rows [n0, n0 + BLOCK_N), query blocks [lo, fs) and
    # [fe, hi) need the mask, [fs, fe) see every key of the block; BLOCK_M-aligned except hi.
    n1 = tl.minimum(n0 + BLOCK_N, seqlen_k)
    lo = n0 * 0
    hi = n0 * 0 + seqlen_q
    fs = lo
    fe = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        lo = tl.maximum(n0 - off - wr, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        fs = tl.maximum(n1 - 1 - off - wr, 0)
        fs = ((fs + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(n1 - off + wl, seqlen_q)
        fe = (tl.minimum(n0 - off + wl + 1, seqlen_q) // BLOCK_M) * BLOCK_M
    fs = tl.maximum(fs, lo)
    fe = tl.minimum(fe, hi)
    no_full = fs >= fe
    fs = tl.where(no_full, tl.maximum(hi, lo), fs)
    fe = tl.where(no_full, tl.maximum(hi, lo), fe)
    return lo, fs, fe, hi
