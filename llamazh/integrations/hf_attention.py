"""The ``"llamazh"`` attention implementation for transformers 5.x.

``register()`` adds two entries under the name ``"llamazh"``:

* an attention function (``AttentionInterface``) with transformers' contract
  ``fn(module, query (B, H, Sq, D), key/value (B, Hkv, Sk, D), attention_mask, scaling, ...)
  -> (out (B, Sq, H, D), None)``;
* a mask function (``AttentionMaskInterface``); without one transformers hands every layer
  ``attention_mask=None`` and padding is silently ignored.

On CUDA (where the kernels run) the mask function returns what flash-attention gets: ``None``
for plain causal batches, else the 2-D padding mask, which the attention function turns into
packed sequences (unpad, :func:`llamazh.attention.flash_attn_varlen_func` or flash-attn's, pad).
Packed inputs given by ``position_ids`` arrive as transformers' 4-D mask; when that mask is
exactly block-diagonal causal per ``position_ids`` segment they run packed too. Anything else
(custom 4-D masks, dropout, other devices) runs transformers' own SDPA function on SDPA's
mask, so the results there are SDPA's, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from llamazh._change import Change

NAME = "llamazh"
# tests flip this to run the kernel path on CPU tensors under TRITON_INTERPRET=1
_KERNELS_ON_CPU = False


def _kernel_path(device: Any) -> bool:
    if device is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    if _KERNELS_ON_CPU and device.type == "cpu":
        from llamazh.kernels.flash_attn_common import interpreter_on

        return interpreter_on()
    return False


def _backend(device: torch.device) -> str:
    return "auto" if device.type == "cuda" else "triton"


def llamazh_attention_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Mask function registered with ``AttentionMaskInterface`` (transformers' signature,
    forwarded untouched so that it follows transformers' own changes).

    Kernel path: flash-attention's 2-D padding mask (or ``None``) unless the mask has extra
    structure (custom ``and``/``or`` mask functions, packed sequences, compiled caches): then,
    as everywhere else, SDPA's 4-D boolean mask.
    """
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    plain = not kwargs.get("use_vmap", False) and (
        kwargs.get("attention_mask") is not None or kwargs.get("allow_is_causal_skip", True)
    )
    if plain and _kernel_path(kwargs.get("device")):
        return flash_attention_mask(*args, **kwargs)
    return sdpa_mask(*args, **kwargs)


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _packed_segments(mask: torch.Tensor, position_ids: Any, window: int | None) -> Any:
    """cu_seqlens if the 4-D mask is exactly causal within position_ids segments, else None."""
    b, _, sq, sk = mask.shape
    if not isinstance(position_ids, torch.Tensor) or sq != sk or mask.shape[1] != 1:
        return None
    cached = getattr(mask, "_llamazh_packed", None)
    if cached is not None and cached[0] is position_ids:
        return cached[1]
    pos = position_ids.expand(b, -1).to(mask.device)
    if pos.shape[-1] != sq:
        return None
    first = pos[:, :1] - 1
    starts = torch.diff(pos, prepend=first, dim=-1) != 1  # (B, S): a new segment begins
    seg = starts.cumsum(-1)
    i = torch.arange(sq, device=mask.device)
    expected = (seg[:, :, None] == seg[:, None, :]) & (i[None, :, None] >= i[None, None, :])
    if window is not None:
        expected &= (i[:, None] - i[None, :]) < window
    result = None
    if torch.equal(expected, mask[:, 0]):
        starts[:, 0] = True
        idx = starts.reshape(-1).nonzero().view(-1).to(torch.int32)
        cu = torch.cat([idx, torch.tensor([b * sq], dtype=torch.int32, device=mask.device)])
        result = (cu, int(cu.diff().max()))
    mask._llamazh_packed = (position_ids, result)  # one check per forward, not per layer
    return result


def llamazh_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered with ``AttentionInterface`` (transformers' contract).

    Args:
        query: (B, H, Sq, D); key, value: (B, Hkv, Sk, D) (KV heads not repeated).
        attention_mask: ``None``, a 2-D (B, Sk) padding mask (kernel path) or a 4-D mask.
        kwargs: ``is_causal``, ``sliding_window``, ``softcap``, ``position_ids``,
            ``cu_seq_lens_q/k`` and ``max_length_q/k`` as transformers passes them.

    Returns:
        (out (B, Sq, H, D), None).
    """
    from llamazh.attention import attention

    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    sliding_window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap") or 0.0
    training_dropout = dropout > 0 and module.training
    kernel = _kernel_path(query.device) and not training_dropout and query.shape[-1] <= 256
    mask4 = attention_mask is not None and attention_mask.ndim == 4
    packed = None
    if kernel and mask4 and is_causal:
        packed = _packed_segments(attention_mask, kwargs.get("position_ids"), sliding_window)
    if not kernel or (mask4 and packed is None):
        return _fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    b, h, sq, d = query.shape
    # (B, H, S, D) -> (B, S, H, D): views, the head dim stays contiguous
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    window = (sliding_window - 1, -1) if sliding_window else (-1, -1)
    opts = dict(causal=bool(is_causal), softmax_scale=scaling, window_size=window, softcap=softcap)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if packed is None and cu_q is not None and cu_k is not None and b == 1:
        packed = (cu_q.to(torch.int32), int(kwargs.get("max_length_q") or cu_q.diff().max()))
        packed_k = (cu_k.to(torch.int32), int(kwargs.get("max_length_k") or cu_k.diff().max()))
    else:
        packed_k = packed
    if packed is not None:
        flat = [t.reshape(-1, t.shape[2], d) for t in (q, k, v)]  # (B * S, H, D)
        out = _varlen(*flat, packed, packed_k, opts, query.device)
        return out.view(b, sq, h, d), None
    if attention_mask is None:
        return attention(q, k, v, backend=_backend(query.device), **opts), None
    idx_q, idx_k, pq, pk = _unpad_indices(attention_mask, sq, k.shape[1])
    kf, vf = (t.reshape(-1, t.shape[2], d)[idx_k] for t in (k, v))  # (total_k, Hkv, D)
    out_packed = _varlen(q.reshape(-1, h, d)[idx_q], kf, vf, pq, pk, opts, query.device)
    out = q.new_zeros(b * sq, h, d).index_copy(0, idx_q, out_packed)  # padded queries -> 0
    return out.view(b, sq, h, d), None


def _unpad_indices(mask: torch.Tensor, sq: int, sk: int) -> tuple:
    """Token indices and (cu_seqlens, max_len) of queries and keys kept by a 2-D padding mask.

    Keys are where the mask is True, queries are its last Sq columns; a static cache is longer
    than the mask, its unused slots (at the end) count as padding. Cached on the mask, which
    every layer of one forward shares (the host syncs happen once, not per layer).
    """
    cached = getattr(mask, "_llamazh_unpad", None)
    if cached is not None and cached[0] == (sq, sk):
        return cached[1]
    keep_q = mask[:, -sq:].bool()
    keep_k = mask.bool()
    if keep_k.shape[1] < sk:
        keep_k = torch.nn.functional.pad(keep_k, (0, sk - keep_k.shape[1]), value=False)
    len_q, len_k = keep_q.sum(1), keep_k.sum(1)
    result = (
        keep_q.reshape(-1).nonzero().view(-1),
        keep_k.reshape(-1).nonzero().view(-1),
        (_cu_seqlens(len_q), int(len_q.max())),
        (_cu_seqlens(len_k), int(len_k.max())),
    )
    mask._llamazh_unpad = ((sq, sk), result)
    return result


def _varlen(q, k, v, packed_q, packed_k, opts, device) -> torch.Tensor:
    from llamazh.attention import flash_attn_varlen_func
    from llamazh.attention.dispatch import resolve_backend

    (cu_q, max_q), (cu_k, max_k) = packed_q, packed_k
    if device.type == "cuda" and resolve_backend(q, "auto") == "flash_attn":
        import flash_attn

        if not opts["softcap"]:  # flash-attn < 2.6 has no softcap argument
            opts = {key: val for key, val in opts.items() if key != "softcap"}
        return flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **opts)
    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **opts)


def _fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """transformers' SDPA function (eager math when a softcap is set, which SDPA lacks)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.ndim == 2:
        # a flash-style padding mask reached a path without kernels (dropout while training,
        # head dim > 256): expand it to the 4-D mask SDPA's mask function would have built
        attention_mask = _expand_padding_mask(
            attention_mask, query.shape[2], key.shape[2], kwargs, module
        )
    if kwargs.get("softcap"):
        return _eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    kwargs.pop("softcap", None)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _expand_padding_mask(
    mask: torch.Tensor, sq: int, sk: int, kwargs: dict, module
) -> torch.Tensor:
    keep = mask.bool()
    if keep.shape[1] < sk:
        keep = torch.nn.functional.pad(keep, (0, sk - keep.shape[1]), value=False)
    i = torch.arange(sq, device=mask.device)[:, None] + (keep.shape[1] - sq)  # key position
    j = torch.arange(sk, device=mask.device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=mask.device)
    is_causal = kwargs.get("is_causal")
    if is_causal if is_causal is not None else getattr(module, "is_causal", True):
        allowed &= j <= i
    if kwargs.get("sliding_window"):
        allowed &= i - j < kwargs["sliding_window"]
    return allowed[None, None] & keep[:, None, None, :]  # (B, 1, Sq, Sk)


def _eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))  # (B, H, Sk, D)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    cap = kwargs["softcap"]
    scores = cap * torch.tanh(scores / cap)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if attention_mask is None and is_causal:
        sq, sk = scores.shape[-2:]
        i = torch.arange(sq, device=scores.device)[:, None] + sk - sq
        attention_mask = torch.arange(sk, device=scores.device)[None, :] <= i
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"llamazh"`` with transformers' attention and mask-function registries.

    Idempotent; ``import llamazh`` arranges for it to run when transformers is imported.
    """
    from transformers import AttentionInterface

    from llamazh.integrations.hf_compat import attention_mask_interface

    AttentionInterface.register(NAME, llamazh_attention_forward)
    attention_mask_interface().register(NAME, llamazh_attention_mask)


def patch_attention(model: Any, attention: str) -> list[Change]:
    """Switch ``model`` (that instance) to the ``attention`` implementation, undoably.

    Args:
        model: a transformers ``PreTrainedModel`` built on ``AttentionInterface``.
        attention: ``"llamazh"`` (or any name transformers' registry knows, e.g. ``"sdpa"``).

    Returns:
        One :class:`~llamazh.patching.Change` whose ``undo`` restores the previous setting.

    Raises:
        ValueError: unknown name, or a model that cannot switch its attention.

    Example:
        >>> changes = patch_attention(model, "llamazh")
        >>> changes[0].undo()
    """
    register()
    from transformers import AttentionInterface

    valid = ["eager", *AttentionInterface().valid_keys()]
    if attention not in valid:
        raise ValueError(f"attention must be one of {valid}, got attention={attention!r}")
    config = getattr(model, "config", None)
    setter = getattr(model, "set_attn_implementation", None)
    if config is None or setter is None:
        raise ValueError(
            f"attention patching needs a transformers PreTrainedModel with "
            f"set_attn_implementation, got {type(model).__name__}"
        )
    can_set = getattr(model, "_can_set_attn_implementation", lambda: True)
    if not can_set():
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through AttentionInterface, "
            "so its attention cannot be switched"
        )
    before = config._attn_implementation
    setter(attention)

    def undo() -> None:
        setter(before)

    what = f"{type(model).__name__}.config._attn_implementation: {before!r} -> {attention!r}"
    return [Change(what, undo)]
