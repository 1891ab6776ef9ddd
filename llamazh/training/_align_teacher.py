"""The base model's side of :func:`llamazh.training.align_embeddings`: texts grouped into
chunks, the teacher pass over a chunk (the targets kept for later steps), the base's states
for each new token's pieces, and running a decoder only as deep as a given layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llamazh.evaluation import pad_right


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass after the layer it is on."""


@dataclass
class _Chunk:
    """One teacher pass: a batch of texts in both tokenizations and what the base said."""

    new_ids: Tensor  # (B, Sn) extended ids, padded with 0
    new_mask: Tensor  # (B, Sn) 1 on real tokens
    mid: Tensor  # (M, D) base residual after `input_layer` layers at those positions
    mid_at: Tensor  # (M, 2) (row, extended position) of each `mid` row


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (``model.model.layers`` for transformers' causal LMs)."""
    decoder = (
        model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    )
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(
            f"model ({type(model).__name__}) has no decoder with a `layers` list; "
            "align_embeddings needs a transformers decoder-only causal LM"
        )
    return layers


_CUT_AFTER = "\n。！？；.!?;"  # a piece of a long text ends after one of these where one is near


def _split_long(texts: list[str], count, max_length: int) -> list[str]:
    """``texts`` with every text of more than ``max_length`` tokens (``count(text)``) cut into
    consecutive pieces that fit, in order: after the last line or sentence end in the second
    half of the span that should fit (by the text's tokens per character, with a 10% margin),
    else inside it; a piece that still does not fit is cut again."""
    out: list[str] = []
    stack = list(reversed(texts))
    while stack:
        text = stack.pop()
        n = count(text)
        if n <= max_length or len(text) < 2:
            out.append(text)  # a single character over the limit is cut by the teacher
            continue
        cut = min(len(text) - 1, max(1, len(text) * max_length * 9 // (10 * n)))
        end = max(text.rfind(c, cut // 2, cut) for c in _CUT_AFTER)
        if end >= 0:
            cut = end + 1
        stack += [text[cut:], text[:cut]]
    return out


def _chunks(order: list[int], enc: list[list[int]], budget: int, max_length: int, extra: int):
    """Text indices (shortest first) grouped so that rows x longest row <= ``budget`` tokens."""
    out, cur, width = [], [], 0
    for i in order:
        n = min(len(enc[i]), max_length) + extra
        if cur and (len(cur) + 1) * max(width, n) > budget:
            out.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, n)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def _teacher(base, batch, old_enc, new_enc, prefix, ends_old, ends_new, input_layer,
             max_length, full, head_old, bias_old):  # fmt: skip
    """The base reads ``batch`` in its tokens: the chunk for input steps and, when ``full``,
    output targets ``(h (P, D), lse_old (P,), next extended id (P,))`` (else empty); the
    log-partition of the old tokens comes from ``head_old`` (V_old, D), the extended model's
    old rows (which ``output_share`` may have lowered), not from the base's logits."""
    device = base.get_input_embeddings().weight.device
    olds, news, wheres = [], [], []
    for i in batch:
        o = prefix + old_enc[i][:max_length]
        ob = ends_old(o)
        pos = {b: q for q, b in enumerate(ob)}
        n = prefix + new_enc[i]
        nb = ends_new(n)
        keep = next((j for j in range(len(n) - 1, -1, -1) if nb[j] <= ob[-1]), 0) + 1
        n, nb = n[:keep], nb[:keep]
        olds.append(o)
        news.append(n)
        wheres.append([pos.get(b, -1) for b in nb])
    o_ids, o_mask = pad_right(olds)
    o_ids, o_mask = o_ids.to(device), o_mask.to(device)
    if full:
        res = base.get_decoder()(
            input_ids=o_ids, attention_mask=o_mask, output_hidden_states=True, use_cache=False
        )
        final = res.last_hidden_state.float()  # (B, So, D), after the final norm
        mid_all = res.hidden_states[input_layer].float()  # (B, So, D)
    else:  # input targets only: the base runs its first input_layer layers
        mid_all = _run_to_layer(base, _decoder_layers(base)[input_layer - 1], o_ids, o_mask).float()
    n_ids, n_mask = pad_right(news)
    hs, ys, mid_rows, mid_at = [], [], [], []
    for r, (n, w) in enumerate(zip(news, wheres)):
        for j, q in enumerate(w):
            if q < 0:
                continue
            mid_rows.append(mid_all[r, q])
            mid_at.append((r, j))
            if full and j + 1 < len(n) and w[j + 1] >= 0:
                hs.append(final[r, q])
                ys.append(n[j + 1])
    chunk = _Chunk(n_ids, n_mask, torch.stack(mid_rows), torch.tensor(mid_at))
    dim = mid_all.shape[-1]
    H = torch.stack(hs) if hs else mid_all.new_zeros(0, dim)
    logits = H @ head_old.t()  # (P, V_old)
    if bias_old is not None:
        logits = logits + bias_old
    L = torch.logsumexp(logits, dim=-1)  # (P,)
    return chunk, (H, L, torch.tensor(ys, dtype=torch.long))


@torch.no_grad()
def _piece_states(base, old_tok, new_tok, n_old, prefix, layer) -> Tensor:
    """(K, D): for each new token, the base's residual after ``layer`` layers at the last of its
    pieces, read alone after ``prefix``; RMS-normalised per token (zeros: no pieces)."""
    from llamazh.tokenizer._sources import as_view, piece_splitter

    split = piece_splitter(as_view(old_tok, "old_tokenizer"))
    tokens = new_tok.convert_ids_to_tokens(list(range(n_old, len(new_tok))))
    pieces = [split(t) if t else [] for t in tokens]
    first = base.get_input_embeddings().weight
    out = torch.zeros(len(pieces), first.shape[1], device=first.device)
    by_len: dict[int, list[int]] = {}
    for k, p in enumerate(pieces):
        if p:
            by_len.setdefault(len(p), []).append(k)
    stop = _decoder_layers(base)[layer - 1]
    for ks in by_len.values():
        for i in range(0, len(ks), 256):
            batch = ks[i : i + 256]
            ids = torch.tensor([prefix + pieces[k] for k in batch], device=first.device)
            h = _run_to_layer(base, stop, ids, torch.ones_like(ids))[:, -1].float()  # (b, D)
            out[batch] = h * h.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).rsqrt()
    return out


def _run_to_layer(model: nn.Module, layer: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """The residual stream after ``layer`` (B, S, D): the forward stops there."""
    captured: dict[str, Tensor] = {}

    def hook(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]
