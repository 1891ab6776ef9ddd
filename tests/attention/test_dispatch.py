"""The dispatcher: every backend computes the reference's semantics; errors name the fix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.attention import attention, attention_reference, resolve_backend, window_mask
from llamazh.testing import assert_close, assert_grad_close


def _qkv(b, sq, sk, h, hkv, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(s, generator=gen).to(device, dtype)
        for s in ((b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d))
    )


def test_reference_matches_an_independent_oracle():
    # pinned to PyTorch's SDPA math with an explicit mask (top-left causal when square)
    q, k, v = _qkv(2, 23, 23, 4, 2, 32, torch.float64)
    out = attention_reference(q, k, v, causal=True)
    kk, vv = (t.repeat_interleave(2, dim=2).transpose(1, 2) for t in (k, v))
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kk, vv, is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_window_mask_is_bottom_right_aligned():
    # flash-attn >= 2.1: with Sq < Sk the last query sees every key
    assert window_mask(2, 4, causal=True).tolist() == [
        [True, True, True, False],
        [True, True, True, True],
    ]
    assert window_mask(3, 2, causal=True).tolist() == [
        [False, False],
        [True, False],
        [True, True],
    ]
    assert window_mask(3, 3, window_size=(1, 0)).tolist() == [
        [True, False, False],
        [True, True, False],
        [False, True, True],
    ]


BACKENDS_HERE = ["sdpa", "eager", "triton"]


@given(
    sq=st.sampled_from([1, 9, 31]), sk=st.sampled_from([1, 9, 40]),
    heads=st.sampled_from([(4, 4), (4, 1), (6, 2)]), causal=st.booleans(),
    window=st.sampled_from([(-1, -1), (4, -1), (0, 2)]),
)  # fmt: skip
def test_backends_agree(device, sq, sk, heads, causal, window):
    q, k, v = _qkv(2, sq, sk, heads[0], heads[1], 32, torch.float16, device)
    opts = dict(causal=causal, window_size=window)
    leaves = {}
    outs = {}
    for backend in BACKENDS_HERE:
        leaves[backend] = [t.clone().requires_grad_() for t in (q, k, v)]
        outs[backend] = attention(*leaves[backend], backend=backend, **opts)
    refs = [t.float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*refs, **opts)
    base_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    base = attention_reference(*base_leaves, upcast=False, **opts)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(device)
    want = torch.autograd.grad(ref, refs, dout)
    base_g = torch.autograd.grad(base, base_leaves, dout.half())
    for backend, out in outs.items():
        assert_close(out, ref, base, name=f"{backend} out")
        got = torch.autograd.grad(out, leaves[backend], dout.half())
        for name, g, w, bg in zip("qkv", got, want, base_g):
            assert_grad_close(g, w, bg, name=f"{backend} d{name}")


def test_softcap_is_eager_on_cpu_and_refused_by_sdpa():
    q, k, v = _qkv(1, 5, 5, 2, 2, 16)
    assert resolve_backend(q, softcap=5.0) == "eager"
    assert resolve_backend(q) == "sdpa"
    with pytest.raises(ValueError, match="softcap"):
        attention(q, k, v, softcap=5.0, backend="sdpa")
    ref = attention_reference(q.double(), k.double(), v.double(), softcap=5.0)
    base = attention_reference(q, k, v, softcap=5.0, upcast=False)
    assert_close(attention(q, k, v, softcap=5.0), ref, base)


def test_bad_arguments_name_themselves():
    q, k, v = _qkv(1, 5, 5, 2, 2, 16)
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="window_size"):
        attention(q, k, v, window_size=(1,))
    with pytest.raises(ValueError, match="Hkv"):
        attention(q, k[:, :, :1].repeat(1, 1, 3, 1), v[:, :, :1].repeat(1, 1, 3, 1))


def test_missing_flash_attn_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_flash(name, *args, **kwargs):
        if name == "flash_attn":
            raise ImportError("No module named 'flash_attn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flash)
    q, k, v = _qkv(1, 5, 5, 2, 2, 16)
    with pytest.raises(ImportError, match=r"pip install 'llamazh\[flash\]'"):
        attention(q, k, v, backend="flash_attn")


@pytest.mark.gpu
def test_gpu_auto_uses_a_kernel_and_matches_sdpa():
    q, k, v = _qkv(2, 1000, 1000, 8, 2, 128, torch.bfloat16, "cuda")
    assert resolve_backend(q) in ("flash_attn", "triton")
    ref = attention_reference(q.float(), k.float(), v.float(), causal=True)
    base = attention_reference(q, k, v, causal=True, upcast=False)
    for backend in ("auto", "triton", "sdpa"):
        assert_close(attention(q, k, v, causal=True, backend=backend), ref, base, name=backend)


def test_import_is_light():
    # kernels and transformers load on first use, never at import
    import subprocess
    import sys

    code = (
        "import sys, llamazh.attention; "
        "heavy = {'triton', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
