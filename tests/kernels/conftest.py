"""Shared helpers of the kernel tests: random inputs and the reference comparison."""

from __future__ import annotations

import pytest
import torch

from llamazh.attention.reference import attention_reference
from llamazh.testing import assert_close, assert_grad_close, reference_dtype


def make_qkv(b, sq, sk, h, hkv, d, dtype, device, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d))
    return tuple(
        torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for s in shapes
    )


def check_attention(run, q, k, v, *, grads=True, seed=1, **opts):
    """``run(q, k, v, **opts)`` against the reference: outputs 2x, gradients 3x (flash-attn rule).

    Reference: the eager math in fp64 (fp32 inputs) or fp32 (half inputs); baseline: the same
    eager math in the inputs' dtype.
    """
    ref_dtype = reference_dtype(q.dtype)
    leaves = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    refs = [t.detach().to(ref_dtype).requires_grad_(grads) for t in (q, k, v)]
    bases = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    out = run(*leaves, **opts)
    ref = attention_reference(*refs, **opts)
    base = attention_reference(*bases, upcast=False, **opts)
    assert_close(out, ref, base, name="out")
    if not grads:
        return out
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, refs, dout.to(ref_dtype))
    base_g = torch.autograd.grad(base, bases, dout)
    for name, g, w, bg in zip("qkv", got, want, base_g):
        assert_grad_close(g, w, bg, name=f"d{name}")
    return out


@pytest.fixture(scope="session")
def check():
    return check_attention


@pytest.fixture(scope="session")
def qkv():
    return make_qkv
