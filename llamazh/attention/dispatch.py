"""``attention(q, k, v, ..., backend="auto")``: one semantics, four implementations.

Every backend computes the same thing as :func:`llamazh.attention.attention_reference`:
(B, S, H, D) layout, GQA, bottom-right causal alignment, sliding window, softcap, rows with no
visible key -> 0. The backend is resolved at call time from the tensors, never at import.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llamazh._checks import check_choice, check_softcap, check_window_size
from llamazh.attention.reference import attention_reference, window_mask

BACKENDS = ("auto", "flash_attn", "triton", "sdpa", "eager")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(q: torch.Tensor, backend: str = "auto", *, softcap: float = 0.0) -> str:
    """The backend :func:`attention` will run for ``q``: ``backend`` itself unless "auto".

    "auto" picks flash-attn (installed, CUDA, fp16/bf16), then the llamazh Triton kernels
    (CUDA), then PyTorch SDPA, then eager (the only CPU path with ``softcap``).
    """
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        return backend
    half = q.dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and half and q.shape[-1] % 8 == 0 and _has_module("flash_attn"):
        return "flash_attn"
    if q.is_cuda and _has_module("triton"):
        return "triton"
    return "sdpa" if softcap == 0 else "eager"


def _run_flash_attn(q, k, v, *, causal, softmax_scale, window_size, softcap):
    try:
        import flash_attn
    except ImportError as exc:
        raise ImportError(
            "backend='flash_attn' needs flash-attn: pip install 'llamazh[flash]' "
            "(or use backend='triton', which needs no compilation)"
        ) from exc
    kwargs: dict = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size)
    if softcap > 0:
        if "softcap" not in inspect.signature(flash_attn.flash_attn_func).parameters:
            raise ValueError(
                f"softcap={softcap} needs flash-attn >= 2.6, found {flash_attn.__version__}"
            )
        kwargs["softcap"] = softcap
    return flash_attn.flash_attn_func(q, k, v, **kwargs)


def _run_triton(q, k, v, *, causal, softmax_scale, window_size, softcap):
    if not _has_module("triton"):
        raise ImportError("backend='triton' needs Triton: pip install 'llamazh[triton]'")
    from llamazh.attention.functions import flash_attn_func

    return flash_attn_func(
        q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
        softcap=softcap,
    )  # fmt: skip


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


def _run_sdpa(q, k, v, *, causal, softmax_scale, window_size, softcap):
    if softcap > 0:
        raise ValueError(
            f"backend='sdpa' has no softcap (got softcap={softcap}); use backend='triton', "
            "'flash_attn' or 'eager'"
        )
    sq, sk, h, hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    # (B, S, H, D) -> (B, H, S, D)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kwargs: dict = {"scale": softmax_scale}
    if h != hkv:
        if _SDPA_GQA:
            kwargs["enable_gqa"] = True
        else:
            kt = kt.repeat_interleave(h // hkv, dim=1)
            vt = vt.repeat_interleave(h // hkv, dim=1)
    visible = None
    if causal and sq == sk and window_size == (-1, -1):
        kwargs["is_causal"] = True  # square: top-left and bottom-right alignment agree
    elif causal or window_size != (-1, -1):
        mask = window_mask(sq, sk, causal=causal, window_size=window_size, device=q.device)
        visible = mask.any(-1)  # (Sq,)
        # rows with no key: let SDPA see everything (no NaN, in either pass), then zero them
        kwargs["attn_mask"] = mask | ~visible[:, None]
    out = F.scaled_dot_product_attention(qt, kt, vt, **kwargs).transpose(1, 2)  # (B, Sq, H, D)
    if visible is not None and not bool(visible.all()):
        out = out * visible[:, None, None].to(out.dtype)
    return out


def _run_eager(q, k, v, *, causal, softmax_scale, window_size, softcap):
    return attention_reference(
        q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
        softcap=softcap,
    )  # fmt: skip


_RUNNERS: dict[str, Callable[..., torch.Tensor]] = {
    "flash_attn": _run_flash_attn,
    "triton": _run_triton,
    "sdpa": _run_sdpa,
    "eager": _run_eager,
}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact multi-head attention with one semantics across backends (differentiable).

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0.
        causal: bottom-right aligned causal mask (query i sits at key position i + Sk - Sq).
        softmax_scale: defaults to 1 / sqrt(D).
        window_size: (left, right) sliding window around that diagonal, -1 = unbounded.
        softcap: > 0 applies softcap * tanh(scores / softcap) before the softmax.
        backend: "auto" (see :func:`resolve_backend`), "flash_attn" (flash-attn package),
            "triton" (llamazh kernels: CUDA, or CPU under TRITON_INTERPRET=1), "sdpa"
            (PyTorch; no softcap) or "eager" (:func:`attention_reference`, fp32 math).

    Returns:
        (B, Sq, H, D) in q's dtype; rows with no visible key are 0.

    Raises:
        ValueError: unknown backend, bad shapes/options, or an option the backend lacks.
        ImportError: the chosen backend's package is missing (with the pip command).

    Example:
        >>> q = torch.randn(1, 9, 4, 64); k = v = torch.randn(1, 9, 2, 64)
        >>> out = attention(q, k, v, causal=True)  # SDPA on a CPU
        >>> torch.allclose(out, attention(q, k, v, causal=True, backend="eager"), atol=1e-5)
        True
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D (B, S, H, D) tensor, got {got}")
    if q.shape[2] % k.shape[2] != 0 or k.shape != v.shape:
        raise ValueError(
            f"need H % Hkv == 0 and k.shape == v.shape, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    window_size = check_window_size("window_size", window_size)
    softcap = check_softcap("softcap", softcap)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got causal={causal!r}")
    name = resolve_backend(q, backend, softcap=softcap)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return _RUNNERS[name](
        q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
        softcap=softcap,
    )  # fmt: skip
