"""Fused RoPE kernel (under TRITON_INTERPRET=1 on CPU) against the shipped reference, and the
reference against transformers' ``apply_rotary_pos_emb``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.rope import NoScaling, YaRNScaling, apply_rotary, apply_rotary_reference, rope_cos_sin
from llamazh.testing import assert_close, assert_grad_close, reference_dtype


def _positions(kind: str, B: int, S: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "random":
        return torch.randint(0, 3 * S, (B, S), generator=gen)
    # packed: several documents per row, each restarting at 0
    rows = []
    for _ in range(B):
        cuts = sorted(torch.randint(1, max(S, 2), (2,), generator=gen).tolist())
        row = torch.cat([torch.arange(n) for n in (cuts[0], cuts[1] - cuts[0], S - cuts[1])])
        rows.append(row)
    return torch.stack(rows)


def _case(data, dtype, device):
    B = data.draw(st.integers(1, 2), label="B")
    S = data.draw(st.sampled_from([1, 7, 19, 33]), label="S")
    Hk = data.draw(st.sampled_from([1, 2, 3]), label="Hk")
    Hq = Hk * data.draw(st.sampled_from([1, 2, 4]), label="group")
    D = data.draw(st.sampled_from([8, 16, 40, 64, 80]), label="D")
    R = data.draw(st.sampled_from(sorted({D, D // 2 + (D // 2) % 2, 8})), label="rotary_dim")
    layout = data.draw(st.sampled_from(["bshd", "bhsd"]), label="layout")
    interleaved = data.draw(st.booleans(), label="interleaved")
    pos_kind = data.draw(st.sampled_from(["none", "random", "packed"]), label="positions")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    shape_q = (B, S, Hq, D) if layout == "bshd" else (B, Hq, S, D)
    shape_k = (B, S, Hk, D) if layout == "bshd" else (B, Hk, S, D)
    q = torch.randn(shape_q, generator=gen).to(device, dtype)
    k = torch.randn(shape_k, generator=gen).to(device, dtype)
    pos = _positions(pos_kind, B, S, gen)
    strategy = YaRNScaling(4.0, 16) if data.draw(st.booleans(), label="yarn") else NoScaling()
    inv_freq, scale = strategy.inv_freq(R, 10000.0)
    rows = torch.arange(3 * S) if pos is not None else torch.arange(S)
    cos, sin = rope_cos_sin(inv_freq, rows, attention_factor=scale, full_width=False)
    kwargs = dict(layout=layout, rotary_dim=R, interleaved=interleaved)
    if pos is not None:
        kwargs["position_ids"] = pos.to(device)
    return q, k, cos.to(device), sin.to(device), kwargs


def _reference(x, cos, sin, kwargs, dtype):
    return apply_rotary_reference(x.to(dtype), cos, sin, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@given(data=st.data())
def test_forward_backward_match_reference(device, dtype, data):
    q, k, cos, sin, kwargs = _case(data, dtype, device)
    ref_dtype = reference_dtype(dtype)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_out, k_out = apply_rotary(q, k, cos, sin, backend="triton", **kwargs)
    for name, x, out in (("q", q, q_out), ("k", k, k_out)):
        assert out.shape == x.shape and out.dtype == dtype and out.stride() == x.stride()
        ref = _reference(x.detach(), cos, sin, kwargs, ref_dtype)
        base = _reference(x.detach(), cos, sin, kwargs, dtype)
        assert_close(out, ref, base, name=name)
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (gq, gk))
    for name, x, g in (("dq", q, gq), ("dk", k, gk)):
        grads = []
        for d in (ref_dtype, dtype):
            leaf = x.detach().to(d).requires_grad_(True)
            apply_rotary_reference(leaf, cos, sin, **kwargs).backward(g.to(d))
            grads.append(leaf.grad)
        assert_grad_close(x.grad, grads[0], grads[1], name=name)


def test_inplace_is_the_only_mutation(device):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 32, generator=gen).to(device)
    k = torch.randn(2, 5, 2, 32, generator=gen).to(device)
    pos = torch.tensor([[0, 1, 2, 0, 1], [4, 5, 6, 7, 8]], device=device)
    inv_freq, _ = NoScaling().inv_freq(16, 1e4)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(9, device=device), full_width=False)
    before = [t.clone() for t in (q, k, cos, sin, pos)]
    expected = apply_rotary(q, k, cos, sin, position_ids=pos, rotary_dim=16, backend="triton")
    for t, b in zip((q, k, cos, sin, pos), before):
        assert torch.equal(t, b)  # out of place: nothing touched
    got = apply_rotary(
        q, k, cos, sin, position_ids=pos, rotary_dim=16, inplace=True, backend="triton"
    )
    assert got[0] is q and got[1] is k
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(q[..., 16:], before[0][..., 16:])  # tail untouched
    for t, b in zip((cos, sin, pos), before[2:]):
        assert torch.equal(t, b)


def test_inplace_autograd_through_non_leaf(device):
    x = torch.randn(1, 6, 2, 16, device=device, requires_grad=True)
    inv_freq, _ = NoScaling().inv_freq(16, 1e4)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(6, device=device), full_width=False)
    q = x * 1.0
    q_out, _ = apply_rotary(q, None, cos, sin, inplace=True, backend="triton")
    q_out.sum().backward()
    leaf = x.detach().double().requires_grad_(True)
    apply_rotary_reference(leaf, cos, sin).sum().backward()
    assert_grad_close(x.grad, leaf.grad, None)


@pytest.mark.parametrize("interleaved", [False, True])
def test_reference_matches_transformers(interleaved):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 11, 64, generator=gen)  # (B, H, S, D)
    k = torch.randn(2, 2, 11, 64, generator=gen)
    inv_freq, scale = YaRNScaling(8.0, 4).inv_freq(64, 1e4)
    pos = torch.tensor([list(range(11)), list(range(5, 16))])
    cos, sin = rope_cos_sin(inv_freq, pos, attention_factor=scale)  # (B, S, D), HF layout
    if not interleaved:
        hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
        ours_q = apply_rotary_reference(q, cos, sin, layout="bhsd")
        ours_k = apply_rotary_reference(k, cos, sin, layout="bhsd")
        assert torch.equal(ours_q, hf_q) and torch.equal(ours_k, hf_k)
        return
    # interleaved == rotate-half after moving the pairs (2i, 2i+1) to (i, i + D/2)
    perm = torch.cat((torch.arange(0, 64, 2), torch.arange(1, 64, 2)))
    ours = apply_rotary_reference(q, cos, sin, layout="bhsd", interleaved=True)
    hf = q[..., perm] * cos.unsqueeze(1) + rotate_half(q[..., perm]) * sin.unsqueeze(1)
    assert torch.equal(ours[..., perm], hf)


def test_backend_auto_uses_torch_on_cpu(monkeypatch):
    import llamazh.rope.apply as apply_module

    def boom(*args, **kwargs):
        raise AssertionError("the kernel must not run for backend='auto' on CPU")

    monkeypatch.setattr(apply_module._RotaryFn, "apply", boom)
    q = torch.randn(1, 3, 1, 8)
    cos, sin = rope_cos_sin(NoScaling().inv_freq(8, 1e4)[0], torch.arange(3))
    out, none = apply_rotary(q, None, cos, sin)
    assert none is None and torch.equal(out, apply_rotary_reference(q, cos, sin))


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from llamazh.kernels.rope import rope_fwd

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 1, 8)
    cos = torch.ones(1, 2, 4)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        rope_fwd(q, None, cos, cos, torch.empty_like(q), None, rotary_dim=8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rotary_dim=7), r"rotary_dim must be even and in \[2, D=16\], got rotary_dim=7"),
        (dict(rotary_dim=32), r"rotary_dim must be even"),
        (dict(layout="sbhd"), r"layout must be one of 'bshd', 'bhsd'; got layout='sbhd'"),
        (dict(backend="cuda"), r"backend must be one of"),
        (dict(position_ids=torch.tensor([0, 1, 9])), r"position_ids must lie in \[0, 4\)"),
        (dict(position_ids=torch.tensor([0, 1])), r"position_ids must be \(S,\)"),
    ],
)
def test_bad_arguments(device, kwargs, match):
    q = torch.randn(1, 3, 2, 16, device=device)
    cos, sin = rope_cos_sin(NoScaling().inv_freq(16, 1e4)[0], torch.arange(4, device=device))
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        apply_rotary(q, q, cos, sin, **{"backend": "triton", **kwargs})


def test_table_width_must_fit():
    q = torch.randn(1, 3, 2, 16)
    with pytest.raises(ValueError, match=r"cos's last dim must be R/2=8 or R=16"):
        apply_rotary(q, None, torch.ones(3, 5), torch.ones(3, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_bf16_on_gpu(layout, interleaved):
    gen = torch.Generator().manual_seed(3)
    shape = (2, 1023, 8, 128) if layout == "bshd" else (2, 8, 1023, 128)
    q = torch.randn(shape, generator=gen).cuda().bfloat16().requires_grad_(True)
    k = torch.randn(shape, generator=gen).cuda().bfloat16().requires_grad_(True)
    inv_freq, scale = YaRNScaling(16.0, 256).inv_freq(96, 1e4)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(1023, device="cuda"), attention_factor=scale)
    kw = dict(layout=layout, rotary_dim=96, interleaved=interleaved)
    q_out, k_out = apply_rotary(q, k, cos, sin, backend="triton", **kw)
    g = torch.randn_like(q_out)
    (q_out * g).sum().backward()
    ref = apply_rotary_reference(q.detach().float(), cos, sin, **kw)
    base = apply_rotary_reference(q.detach(), cos, sin, **kw)
    assert_close(q_out, ref, base)
    ref_k = apply_rotary_reference(k.detach().float(), cos, sin, **kw)
    assert_close(k_out, ref_k, apply_rotary_reference(k.detach(), cos, sin, **kw), name="k")
    leaf32 = q.detach().float().requires_grad_(True)
    apply_rotary_reference(leaf32, cos, sin, **kw).backward(g.float())
    leaf16 = q.detach().requires_grad_(True)
    apply_rotary_reference(leaf16, cos, sin, **kw).backward(g)
    assert_grad_close(q.grad, leaf32.grad, leaf16.grad)
