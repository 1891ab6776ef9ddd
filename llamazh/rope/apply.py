"""Applying rotary embeddings: the PyTorch reference, the fused kernel's autograd Function, the
public ``apply_rotary`` and a thin ``RotaryEmbedding`` module.

Tables: ``cos``/``sin`` hold one value per rotated pair, ``(..., R/2)``, or transformers'
full-width layout ``(..., R)`` whose two halves are equal (then the first half is used). The
kernel reads fp32 tables as given, so pass fp32 tables for the most accurate result.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from torch import nn

from llamazh._checks import check_choice
from llamazh.rope.strategies import NoScaling, RopeScaling
from llamazh.rope.tables import rope_cos_sin

__all__ = ["RotaryEmbedding", "apply_rotary", "apply_rotary_reference"]

Layout = Literal["bshd", "bhsd"]


def _to_bshd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bshd" else x.transpose(1, 2)  # (B, H, S, D) -> (B, S, H, D) view


def _tables(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate and normalise tables to ``(1 or B, P, R/2)`` and positions to ``(B, S)``."""
    B, S = x.shape[0], x.shape[1]
    half = rotary_dim // 2
    out = []
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor) or not table.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {type(table).__name__}")
        if table.shape[-1] not in (half, rotary_dim):
            raise ValueError(
                f"{name}'s last dim must be R/2={half} or R={rotary_dim} (rotary_dim), got "
                f"shape {tuple(table.shape)}"
            )
        table = table[..., :half]  # full width: the halves are equal, keep the first
        want = "(P, W)" if position_ids is not None else "(S, W) or (1 or B, S, W)"
        if table.dim() == 2:
            table = table.unsqueeze(0)
        elif position_ids is not None or table.dim() != 3 or table.shape[0] not in (1, B):
            raise ValueError(f"{name} must be {want}, got shape {tuple(table.shape)}")
        out.append(table)
    if out[0].shape != out[1].shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must match")
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
            raise TypeError("position_ids must be an integer tensor")
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if (
            position_ids.dim() != 2
            or position_ids.shape[1] != S
            or position_ids.shape[0]
            not in (
                1,
                B,
            )
        ):
            raise ValueError(
                f"position_ids must be (S,) or (1 or B, S) with S={S}, B={B}, got "
                f"{tuple(position_ids.shape)}"
            )
        position_ids = position_ids.expand(B, S)
    elif out[0].shape[1] < S:
        raise ValueError(f"cos/sin have {out[0].shape[1]} rows, fewer than S={S} tokens")
    return out[0], out[1], position_ids


def _check_common(q: torch.Tensor, layout: str, rotary_dim: int | None) -> int:
    check_choice("layout", layout, ("bshd", "bhsd"))
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor ({layout}), got {getattr(q, 'shape', q)}")
    D = q.shape[-1]
    rotary_dim = D if rotary_dim is None else rotary_dim
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"rotary_dim must be an int, got rotary_dim={rotary_dim!r}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > D:
        raise ValueError(f"rotary_dim must be even and in [2, D={D}], got rotary_dim={rotary_dim}")
    return rotary_dim


def apply_rotary_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    layout: Layout = "bshd",
    rotary_dim: int | None = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate one tensor in plain PyTorch, in ``x``'s dtype (tables cast to it, as transformers
    does); the oracle for the kernel and the CPU path. Arguments as in :func:`apply_rotary`.

    Example:
        >>> out = apply_rotary_reference(q, cos, sin, layout="bhsd")
    """
    rotary_dim = _check_common(x, layout, rotary_dim)
    xs = _to_bshd(x, layout)
    cos3, sin3, pos = _tables(xs, cos, sin, position_ids, rotary_dim)
    S, half = xs.shape[1], rotary_dim // 2
    if pos is not None:
        c, s = cos3[0][pos], sin3[0][pos]  # (B, S, R/2)
    else:
        c, s = cos3[:, :S], sin3[:, :S]  # (1 or B, S, R/2)
    c = c.unsqueeze(2).to(xs.dtype)  # (., S, 1, R/2): broadcast over heads
    s = s.unsqueeze(2).to(xs.dtype)
    rot = xs[..., :rotary_dim]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    if interleaved:
        rot = torch.stack((o1, o2), dim=-1).flatten(-2)  # (..., R/2, 2) -> (..., R)
    else:
        rot = torch.cat((o1, o2), dim=-1)
    out = torch.cat((rot, xs[..., rotary_dim:]), dim=-1) if rotary_dim < xs.shape[-1] else rot
    return _to_bshd(out, layout)


class _RotaryFn(torch.autograd.Function):
    """Autograd over the Triton launcher; q/k arrive as (B, S, H, D) views."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, rotary_dim, interleaved, inplace):
        from llamazh.kernels.rope import rope_fwd

        q_out = q if inplace else torch.empty_like(q)
        k_out = None if k is None else (k if inplace else torch.empty_like(k))
        rope_fwd(
            q, k, cos, sin, q_out, k_out,
            position_ids=position_ids, rotary_dim=rotary_dim, interleaved=interleaved,
        )  # fmt: skip
        if inplace:
            ctx.mark_dirty(*(t for t in (q, k) if t is not None))
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.rotary_dim, ctx.interleaved = rotary_dim, interleaved
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        from llamazh.kernels.rope import rope_fwd

        cos, sin, position_ids = ctx.saved_tensors
        grad_q = grad_q.contiguous() if grad_q.stride(-1) != 1 else grad_q
        gq = torch.empty_like(grad_q)
        gk = None
        if grad_k is not None:
            grad_k = grad_k.contiguous() if grad_k.stride(-1) != 1 else grad_k
            gk = torch.empty_like(grad_k)
        rope_fwd(
            grad_q, grad_k, cos, sin, gq, gk, position_ids=position_ids,
            rotary_dim=ctx.rotary_dim, interleaved=ctx.interleaved, conjugate=True,
            check_positions=False,
        )  # fmt: skip
        return gq, gk, None, None, None, None, None, None


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    layout: Layout = "bshd",
    rotary_dim: int | None = None,
    interleaved: bool = False,
    inplace: bool = False,
    backend: Literal["auto", "triton", "torch"] = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate queries and keys by their positions' angles (RoPE), forward and backward.

    Args:
        q: ``(B, S, H, D)`` (``layout="bshd"``) or ``(B, H, S, D)`` (``"bhsd"``), fp16/bf16/fp32.
        k: same layout with ``Hkv`` heads, or ``None`` to rotate ``q`` only.
        cos, sin: without ``position_ids``: per token, ``(S, W)`` or ``(1 or B, S, W)``; with
            ``position_ids``: a table ``(P, W)``. ``W`` is ``R/2`` or ``R`` (transformers' layout,
            equal halves). Any float dtype; treated as constants (no gradient).
        position_ids: ``(S,)`` or ``(1 or B, S)`` integer rows into the table (packed sequences
            restart at 0); checked to lie in ``[0, P)``.
        layout: ``"bshd"`` or ``"bhsd"``.
        rotary_dim: ``R``, the rotated leading part of the head dim (default ``D``); the rest
            passes through unchanged.
        interleaved: pair ``(2i, 2i+1)`` (GPT-J) instead of ``(i, i + R/2)`` (Llama, NeoX).
        inplace: write into ``q`` and ``k`` (which are then returned); otherwise new tensors.
        backend: ``"triton"`` (fused kernel), ``"torch"`` (:func:`apply_rotary_reference`) or
            ``"auto"`` (Triton on CUDA when installed, else torch), resolved at call time.

    Returns:
        ``(q_rotated, k_rotated)`` in the input layout and dtype (``k_rotated`` is ``None`` when
        ``k`` is).

    Raises:
        ValueError / TypeError: bad shapes, dtypes, layout, rotary_dim or positions.
        ImportError: ``backend="triton"`` without Triton installed.

    Example:
        >>> inv_freq, scale = YaRNScaling(factor=4.0, original_max_position=2048).inv_freq(128, 1e4)
        >>> cos, sin = rope_cos_sin(inv_freq, torch.arange(8192, device="cuda"), full_width=False)
        >>> q, k = apply_rotary(q, k, cos, sin, layout="bhsd")
    """
    check_choice("backend", backend, ("auto", "triton", "torch"))
    rotary_dim = _check_common(q, layout, rotary_dim)
    qs = _to_bshd(q, layout)
    ks = None
    if k is not None:
        ks = _to_bshd(k, layout)
        if k.dim() != 4 or ks.shape[:2] != qs.shape[:2] or ks.shape[3] != qs.shape[3]:
            raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} except heads")
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_available() else "torch"
    if backend == "torch":
        outs = []
        for x in (q, k):
            if x is None:
                outs.append(None)
                continue
            y = apply_rotary_reference(
                x, cos, sin, position_ids=position_ids, layout=layout,
                rotary_dim=rotary_dim, interleaved=interleaved,
            )  # fmt: skip
            outs.append(x.copy_(y) if inplace else y)
        return outs[0], outs[1]
    if not _triton_available():
        raise ImportError("backend='triton' needs Triton: pip install 'llamazh[triton]'")
    cos3, sin3, pos = _tables(qs, cos, sin, position_ids, rotary_dim)
    if not inplace:  # the kernel needs a unit last stride; a copy is harmless out of place
        qs = qs if qs.stride(-1) == 1 else qs.contiguous()
        ks = ks if ks is None or ks.stride(-1) == 1 else ks.contiguous()
    cos3 = cos3 if cos3.stride(-1) == 1 else cos3.contiguous()
    sin3 = sin3 if sin3.stride(-1) == 1 else sin3.contiguous()
    q_out, k_out = _RotaryFn.apply(qs, ks, cos3, sin3, pos, rotary_dim, interleaved, inplace)
    return _to_bshd(q_out, layout), None if k_out is None else _to_bshd(k_out, layout)


class RotaryEmbedding(nn.Module):
    """Owns a strategy's inverse frequencies and rotates q/k with :func:`apply_rotary`.

    Dynamic strategies follow transformers' rule: the frequencies are recomputed when a longer
    sequence than any seen arrives (grow-only) and reset to the original ones when a sequence
    no longer than the original length arrives after growth.

    Args:
        head_dim: ``D``.
        base: RoPE theta.
        strategy: a :mod:`llamazh.rope` strategy (default :class:`NoScaling`).
        rotary_dim, interleaved, layout, backend: as in :func:`apply_rotary`.

    Example:
        >>> rope = RotaryEmbedding(128, strategy=LinearScaling(factor=4.0))
        >>> q, k = rope(q, k)  # (B, S, H, D), positions 0..S-1
    """

    def __init__(
        self,
        head_dim: int,
        *,
        base: float = 10000.0,
        strategy: RopeScaling | None = None,
        rotary_dim: int | None = None,
        interleaved: bool = False,
        layout: Layout = "bshd",
        backend: Literal["auto", "triton", "torch"] = "auto",
    ) -> None:
        super().__init__()
        self.strategy = strategy if strategy is not None else NoScaling()
        if not isinstance(self.strategy, RopeScaling):
            raise TypeError(f"strategy must be a llamazh.rope strategy, got {self.strategy!r}")
        self.base, self.head_dim = float(base), head_dim
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        self.interleaved, self.layout, self.backend = interleaved, layout, backend
        inv_freq, self.attention_factor = self.strategy.inv_freq(self.rotary_dim, self.base)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        self.max_seq_len_cached = self.strategy.original_length or 0

    def update(self, seq_len: int) -> None:
        """Grow (or reset) a dynamic strategy's frequencies for a sequence of ``seq_len``."""
        original = self.strategy.original_length
        if not self.strategy.is_dynamic or original is None:
            return
        device = self.inv_freq.device
        if seq_len > self.max_seq_len_cached:
            inv_freq, self.attention_factor = self.strategy.inv_freq(
                self.rotary_dim, self.base, seq_len=seq_len, device=device
            )
            self.inv_freq.copy_(inv_freq)
            self.max_seq_len_cached = seq_len
        elif seq_len < original < self.max_seq_len_cached:  # transformers: strictly shorter
            self.inv_freq.copy_(self.original_inv_freq)
            self.attention_factor = self.strategy.inv_freq(self.rotary_dim, self.base)[1]
            self.max_seq_len_cached = original

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotate ``q``/``k`` at ``position_ids`` (``(S,)`` or ``(B, S)``; default ``0..S-1``)."""
        seq_axis = 1 if self.layout == "bshd" else 2
        if position_ids is None:
            position_ids = torch.arange(q.shape[seq_axis], device=q.device)
        if position_ids.numel():
            self.update(int(position_ids.max()) + 1)
        cos, sin = rope_cos_sin(
            self.inv_freq, position_ids, attention_factor=self.attention_factor, full_width=False
        )  # (S, R/2) or (B, S, R/2), fp32
        return apply_rotary(
            q, k, cos, sin, layout=self.layout, rotary_dim=self.rotary_dim,
            interleaved=self.interleaved, backend=self.backend,
        )  # fmt: skip
