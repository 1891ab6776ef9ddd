"""The split-K decoding kernel (Sq <= 16 against a long cache) against the eager reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.attention import attention_reference, flash_attn_func
from llamazh.kernels.flash_decode import launch_decode
from llamazh.testing import assert_close


@given(
    b=st.integers(1, 2), sq=st.sampled_from([1, 2, 5, 16]), sk=st.sampled_from([128, 203]),
    heads=st.sampled_from([(4, 1), (8, 2), (2, 2)]), d=st.sampled_from([32, 80]),
    causal=st.booleans(), window=st.sampled_from([(-1, -1), (40, -1), (0, 0), (7, 3)]),
    softcap=st.sampled_from([0.0, 8.0]),
)  # fmt: skip
def test_decode_matches_reference(device, check, qkv, b, sq, sk, heads, d, causal, window, softcap):
    q, k, v = qkv(b, sq, sk, heads[0], heads[1], d, torch.float16, device)
    with torch.no_grad():  # no autograd: flash_attn_func takes the split-K path
        check(flash_attn_func, q, k, v, grads=False, causal=causal, window_size=window,
              softcap=softcap)  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_split_count_does_not_change_the_result(device, qkv, num_splits):
    q, k, v = qkv(1, 3, 150, 4, 2, 64, torch.float32, device)
    out = torch.empty_like(q)
    lse = torch.empty(1, 4, 3, device=device)
    launch_decode(q, k, v, out, lse, softmax_scale=0.125, window=(-1, 0), softcap=0.0,
                  num_splits=num_splits)  # fmt: skip
    ref, ref_lse = attention_reference(
        q.double(), k.double(), v.double(), causal=True, softmax_scale=0.125, return_lse=True
    )
    base = attention_reference(q, k, v, causal=True, softmax_scale=0.125, upcast=False)
    assert_close(out, ref, base)
    assert_close(lse, ref_lse, name="lse")


def test_decode_empty_rows_are_zero(device, qkv):
    # window (0, 0) with Sq > 1 and a query beyond every key: nothing visible in some rows
    q, k, v = qkv(1, 4, 130, 2, 1, 32, torch.float32, device)
    with torch.no_grad():
        out = flash_attn_func(q, k, v, window_size=(0, 0))
    assert torch.isfinite(out).all()
    ref = attention_reference(q.double(), k.double(), v.double(), window_size=(0, 0))
    assert_close(out, ref, attention_reference(q, k, v, window_size=(0, 0), upcast=False))


@pytest.mark.gpu
def test_gpu_decode_long_cache(check, qkv):
    q, k, v = qkv(4, 1, 32768, 32, 8, 128, torch.bfloat16, "cuda")
    with torch.no_grad():
        check(flash_attn_func, q, k, v, grads=False, causal=True)
