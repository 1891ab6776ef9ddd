"""The losses :func:`llamazh.training.align_embeddings` trains the new rows on: the
extended model's hidden-state mismatch with the base (input rows), the next-token
cross-entropy over old and new rows (output rows), and both at once for ``objective="lm"``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llamazh.training._align_teacher import _run_to_layer


def _mismatch(got: Tensor, want: Tensor) -> Tensor:
    """Mean squared error with each dimension scaled by its spread in ``want`` (M, D): the
    residual stream has a few dimensions hundreds of times larger than the rest, which would
    otherwise be all that the loss sees."""
    scale = want.std(dim=0, keepdim=True).clamp_min(1e-6).reciprocal()  # (1, D)
    return ((got - want) * scale).pow(2).mean()


def _lm_losses(model, inp, out, layers, input_layer, chunk, rows_in, rows_out, new_ids, tied):
    """The extended model reads the chunk with the trainable rows swapped in: next-token
    cross-entropy (mean, nats), the hidden-state mismatch after ``input_layer`` layers, the
    mean squared norm of the final states and the number of predicted tokens."""
    from llamazh.training.embeddings import RowsEmbedding, RowsLinear

    device = rows_in.device
    captured: dict[str, Tensor] = {}

    def grab(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    def grab_head(_module, args):
        captured["x"] = args[0].detach()

    emb = RowsEmbedding(inp, new_ids, rows=rows_in)
    head = (
        RowsLinear(out, new_ids, rows=rows_out)
        if not tied
        else RowsLinear(out, new_ids, rows=rows_in)
    )
    model.set_input_embeddings(emb)
    model.set_output_embeddings(head)
    handles = [layers[input_layer - 1].register_forward_hook(grab),
               head.register_forward_pre_hook(grab_head)]  # fmt: skip
    try:
        ids, mask = chunk.new_ids.to(device), chunk.new_mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
        model.set_input_embeddings(inp)
        model.set_output_embeddings(out)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    lm = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100)
    at = chunk.mid_at.to(device)
    got = captured["h"].float()[at[:, 0], at[:, 1]]  # (M, D)
    hidden = _mismatch(got, chunk.mid.to(device))
    mean_h2 = float(captured["x"].float().pow(2).sum(-1).mean())
    return lm, hidden, mean_h2, int((labels != -100).sum())


def _input_loss(model, inp, layers, input_layer, chunk, rows_in, new_ids) -> Tensor:
    """Mean squared error of the RMS-normalised residual after ``input_layer`` layers."""
    from llamazh.training.embeddings import RowsEmbedding

    device = rows_in.device
    model.set_input_embeddings(RowsEmbedding(inp, new_ids, rows=rows_in))
    try:
        h = _run_to_layer(model, layers[input_layer - 1], chunk.new_ids.to(device),
                          chunk.new_mask.to(device))  # fmt: skip
    finally:
        model.set_input_embeddings(inp)
    h = h.float()  # (B, Sn, D)
    at = chunk.mid_at.to(device)
    got = h[at[:, 0], at[:, 1]]  # (M, D)
    return _mismatch(got, chunk.mid.to(device))


def _output_loss(H, L, Y, head_old, bias_old, rows_out, bias_new, n_old, batch, gen) -> Tensor:
    """Cross-entropy (nats) of the next extended token over [old; new] logits at teacher states."""
    if H.shape[0] > batch:
        pick = torch.randperm(H.shape[0], generator=gen)[:batch].to(H.device)
        H, L, Y = H[pick], L[pick], Y[pick]
    logits_new = H @ rows_out.t()  # (P, K)
    if bias_new is not None:
        logits_new = logits_new + bias_new
    lse = torch.logaddexp(L, torch.logsumexp(logits_new, dim=-1))  # (P,)
    is_new = n_old <= Y
    old_y = Y.clamp(max=n_old - 1)
    target_old = (H * head_old[old_y]).sum(-1)
    if bias_old is not None:
        target_old = target_old + bias_old[old_y]
    target_new = logits_new.gather(1, (Y - n_old).clamp(min=0).unsqueeze(1)).squeeze(1)
    return (lse - torch.where(is_new, target_new, target_old)).mean()
