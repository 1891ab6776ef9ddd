"""The Triton FlashAttention-2 forward and backward against the eager reference.

On a CPU the kernels run under TRITON_INTERPRET=1 with 16 x 16 blocks, so shapes stay small;
the GPU-marked tests cover bf16, long sequences and the backward's repeatability.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.attention import (
    flash_attn_func,
    flash_attn_varlen_func,
    varlen_attention_reference,
)
from llamazh.testing import assert_close

LENGTHS = st.sampled_from([1, 2, 17, 31, 48, 113])
HEADS = st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)])
HEAD_DIMS = st.sampled_from([32, 40, 64, 80, 96])
WINDOWS = st.sampled_from([(-1, -1), (-1, -1), (8, -1), (5, 0), (0, 3), (16, 16)])


@given(
    b=st.integers(1, 2), sq=LENGTHS, sk=LENGTHS, heads=HEADS, d=HEAD_DIMS,
    causal=st.booleans(), window=WINDOWS, softcap=st.sampled_from([0.0, 0.0, 5.0]),
)  # fmt: skip
def test_matches_reference(device, check, qkv, b, sq, sk, heads, d, causal, window, softcap):
    # fp16 against an fp32 reference; fp32 has its own tests below (see the note there)
    q, k, v = qkv(b, sq, sk, heads[0], heads[1], d, torch.float16, device)
    check(flash_attn_func, q, k, v, causal=causal, window_size=window, softcap=softcap)


@pytest.mark.parametrize(
    "sq, sk, causal, window, softcap",
    [(77, 77, True, (-1, -1), 0.0), (17, 48, False, (-1, -1), 5.0), (48, 31, False, (9, 9), 0.0)],
)
def test_matches_reference_fp32(device, check, qkv, sq, sk, causal, window, softcap):
    # Shapes where every row sees several keys: a row that sees exactly one key has dq = 0
    # exactly in the reference, while FlashAttention's dP - rowsum(dO * O) leaves fp32 rounding
    # noise (~1e-7) that the rule's floor, scaled by an all-zero reference, cannot absorb.
    q, k, v = qkv(2, sq, sk, 4, 2, 80, torch.float32, device)
    check(flash_attn_func, q, k, v, causal=causal, window_size=window, softcap=softcap)


@pytest.mark.parametrize("d", [256])
def test_largest_head_dim(device, check, qkv, d):
    q, k, v = qkv(1, 19, 23, 2, 1, d, torch.float32, device)
    check(flash_attn_func, q, k, v, causal=True)


def test_fully_masked_rows_are_zero_not_nan(device, qkv):
    # causal with Sq > Sk: the first Sq - Sk queries sit before every key
    q, k, v = qkv(1, 40, 17, 2, 1, 32, torch.float32, device, requires_grad=True)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :23], torch.zeros_like(out[:, :23]))
    assert torch.isneginf(lse[..., :23]).all() and torch.isfinite(lse[..., 23:]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(
        q.grad[:, :23], torch.zeros_like(q.grad[:, :23])
    )


def test_lse_matches_logsumexp(device, qkv):
    q, k, v = qkv(2, 21, 33, 2, 2, 32, torch.float32, device)
    _, lse = flash_attn_func(q, k, v, causal=True, window_size=(6, -1), return_lse=True)
    from llamazh.attention import attention_reference

    _, ref = attention_reference(
        q.double(), k.double(), v.double(), causal=True, window_size=(6, -1), return_lse=True
    )
    assert_close(lse, ref, name="lse")


def test_strided_inputs_match_contiguous(device, qkv):
    # (B, H, S, D) storage viewed as (B, S, H, D): what transformers hands over
    q, k, v = qkv(1, 33, 33, 4, 2, 64, torch.float32, device)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    torch.testing.assert_close(flash_attn_func(qt, kt, vt, causal=True),
                               flash_attn_func(q, k, v, causal=True), rtol=0, atol=0)  # fmt: skip


@given(
    lens=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=3),
    causal=st.booleans(), window=WINDOWS,
)  # fmt: skip
def test_varlen_matches_reference(device, lens, causal, window):
    gen = torch.Generator().manual_seed(0)
    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (
        torch.randn(n, h, 48, generator=gen).to(device, torch.float16).requires_grad_()
        for n, h in ((sum(lq), 4), (sum(lk), 2), (sum(lk), 2))
    )
    cu_q, cu_k = cu_q.to(device), cu_k.to(device)
    opts = dict(causal=causal, window_size=window)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), **opts)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = varlen_attention_reference(*leaves, cu_q, cu_k, **opts)
    base_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    base = varlen_attention_reference(*base_leaves, cu_q, cu_k, upcast=False, **opts)
    assert_close(out, ref, base)
    dout = torch.randn(out.shape, generator=gen).to(device, torch.float16)
    if out.numel() == 0:
        return
    got = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, dout.float(), allow_unused=True)
    base_g = torch.autograd.grad(base, base_leaves, dout, allow_unused=True)
    for g, w, bg in zip(got, want, base_g):
        w = torch.zeros_like(g, dtype=torch.float32) if w is None else w
        bg = torch.zeros_like(g) if bg is None else bg
        assert_close(g, w, bg, factor=3.0, name="grad")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window_size=(-2, 0)), "window_size"),
        (dict(softcap=-1.0), "softcap"),
        (dict(softmax_scale=0.0), "softmax_scale"),
        (dict(causal=1), "causal"),
    ],
)
def test_bad_options_name_the_argument(device, qkv, kwargs, match):
    q, k, v = qkv(1, 4, 4, 2, 1, 32, torch.float32, device)
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_func(q, k, v, **kwargs)


def test_bad_tensors_name_the_argument(device, qkv):
    q, k, v = qkv(1, 4, 4, 4, 2, 32, torch.float32, device)
    with pytest.raises(ValueError, match="GQA"):
        flash_attn_func(
            q,
            k[:, :, :1].expand(1, 4, 3, 32).contiguous(),
            v[:, :, :1].expand(1, 4, 3, 32).contiguous(),
        )
    with pytest.raises(TypeError, match="dtype"):
        flash_attn_func(q, k.half(), v)
    with pytest.raises(ValueError, match="head dim"):
        flash_attn_func(
            torch.zeros(1, 2, 1, 264, device=device),
            *(torch.zeros(1, 2, 1, 264, device=device),) * 2,
        )
    with pytest.raises(ValueError, match="contiguous"):
        flash_attn_func(q[..., ::2], k[..., ::2], v[..., ::2])
    with pytest.raises(TypeError, match="int32"):
        flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 4]), torch.tensor([0, 4]), 4, 4)


def test_cpu_tensors_need_the_interpreter(monkeypatch, qkv):
    q, k, v = qkv(1, 4, 4, 2, 1, 32, torch.float32, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        flash_attn_func(q, k, v)


# ---- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision(check, qkv, d, dtype):
    q, k, v = qkv(2, 1023, 1023, 8, 2, d, dtype, "cuda")
    check(flash_attn_func, q, k, v, causal=True)
    q, k, v = qkv(1, 300, 700, 4, 4, d, dtype, "cuda")
    check(flash_attn_func, q, k, v, causal=True, window_size=(256, 0), softcap=30.0)


@pytest.mark.gpu
def test_gpu_long_sequence(check, qkv):
    q, k, v = qkv(1, 8192, 8192, 4, 1, 128, torch.bfloat16, "cuda")
    check(flash_attn_func, q, k, v, causal=True)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(qkv):
    q, k, v = qkv(2, 2048, 2048, 8, 2, 128, torch.bfloat16, "cuda", requires_grad=True)
    dout = torch.randn_like(q)
    first = torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    for _ in range(3):
        again = torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
