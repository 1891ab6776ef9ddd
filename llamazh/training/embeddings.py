"""Train only some rows of an embedding or lm_head: the rows of the tokens a vocabulary
extension added.

The frozen weight ``W`` (V, H) stays as it is; the trainable rows live in a small parameter
``rows`` (n, H) for the token ids ``ids`` (n,). The layer behaves as if it used
``W' = W.index_copy(0, ids, rows)`` but never builds ``W'`` nor a (V, H) gradient, so gradient
and optimizer memory scale with n, not V (PEFT's TrainableTokens builds both: a full copy of the
weight in every forward and a dense (V, H) gradient in every backward).

* :class:`RowsEmbedding` looks up ``W`` and substitutes ``rows`` where the input is a new id
  (a ``torch.where``, no data-dependent shapes, so ``torch.compile`` traces it).
* :class:`RowsLinear` (the lm_head) computes ``x @ W'^T`` segment by segment when the ids form
  a few contiguous runs (the usual case: a vocabulary extension appends rows), so it costs the
  same FLOPs as the plain head; for scattered ids it computes ``x @ W^T`` and overwrites the
  ``ids`` columns with ``x @ rows^T``.

Tied embeddings: both wrappers share one ``rows`` parameter and one frozen weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_SEGMENTS = 16  # above this many runs of ids, the scatter path is cheaper than many matmuls


def rows_reference(weight: Tensor, ids: Tensor, rows: Tensor) -> Tensor:
    """The dense weight the wrappers emulate: ``weight`` with rows ``ids`` replaced by ``rows``."""
    return weight.index_copy(0, ids, rows.to(weight.dtype))


def _segments(ids: list[int], vocab: int) -> list[tuple[str, int, int, int]] | None:
    """Split [0, V) into ("base", lo, hi, 0) and ("rows", lo, hi, first_row) runs, or None."""
    order = sorted(range(len(ids)), key=ids.__getitem__)
    segments: list[tuple[str, int, int, int]] = []
    pos = 0
    i = 0
    while i < len(order):
        start = ids[order[i]]
        j = i
        # a run: consecutive ids stored in consecutive rows
        while (
            j + 1 < len(order)
            and ids[order[j + 1]] == ids[order[j]] + 1
            and order[j + 1] == order[j] + 1
        ):
            j += 1
        if start > pos:
            segments.append(("base", pos, start, 0))
        segments.append(("rows", start, ids[order[j]] + 1, order[i]))
        pos = ids[order[j]] + 1
        i = j + 1
    if pos < vocab:
        segments.append(("base", pos, vocab, 0))
    return segments if len(segments) <= MAX_SEGMENTS else None


class _RowsLinearFn(torch.autograd.Function):
    """logits = x @ W'^T with W' = W.index_copy(0, ids, rows); gradients for x and rows only."""

    @staticmethod
    def forward(ctx, x, weight, rows, ids, segments):  # type: ignore[override]
        rows_c = rows.to(x.dtype)
        x2d = x.reshape(-1, x.shape[-1])  # (..., H) -> (N, H)
        vocab = weight.shape[0]
        if segments is not None:
            out = x2d.new_empty(x2d.shape[0], vocab)
            for kind, lo, hi, first in segments:
                src = weight[lo:hi] if kind == "base" else rows_c[first : first + hi - lo]
                torch.mm(x2d, src.t(), out=out[:, lo:hi])  # writes into the strided view
        else:
            out = x2d @ weight.t()
            out[:, ids] = x2d @ rows_c.t()
        ctx.save_for_backward(x2d, weight, rows_c, ids)
        ctx.segments = segments
        ctx.x_shape = x.shape
        ctx.rows_dtype = rows.dtype
        return out.view(*x.shape[:-1], vocab)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2d, weight, rows_c, ids = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (..., V) -> (N, V)
        grad_x = grad_rows = None
        if ctx.segments is not None:
            g_rows = torch.empty(rows_c.shape[0], g.shape[0], dtype=g.dtype, device=g.device)
            if ctx.needs_input_grad[0]:
                grad_x = torch.zeros_like(x2d)
            for kind, lo, hi, first in ctx.segments:
                src = weight[lo:hi] if kind == "base" else rows_c[first : first + hi - lo]
                if grad_x is not None:
                    grad_x.addmm_(g[:, lo:hi], src)
                if kind == "rows":
                    g_rows[first : first + hi - lo] = g[:, lo:hi].t()
        else:
            g_rows = g[:, ids].t()  # (n, N)
            if ctx.needs_input_grad[0]:
                # g @ W' = g @ W + g[:, ids] @ (rows - W[ids]), without building W'
                grad_x = g @ weight
                grad_x.addmm_(g_rows.t(), rows_c - weight[ids])
        if ctx.needs_input_grad[2]:
            grad_rows = (g_rows @ x2d).to(ctx.rows_dtype)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, grad_rows, None, None


class _NewRows(nn.Module):
    """Shared state of the two wrappers: the frozen base layer, ``ids`` (n,) and ``rows`` (n, H)."""

    def __init__(self, base_layer: nn.Module, ids: Tensor, rows: nn.Parameter | None, dtype):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        self.register_buffer(
            "token_ids", ids.to(device=weight.device, dtype=torch.long), persistent=False
        )
        if rows is None:
            rows = nn.Parameter(weight.detach()[self.token_ids].to(dtype or weight.dtype).clone())
        self.rows = rows
        id_list = self.token_ids.tolist()
        self._segments = _segments(id_list, weight.shape[0])

    @property
    def weight(self) -> Tensor:
        """The frozen base weight (V, H) (``get_input_embeddings().weight`` keeps working)."""
        return self.base_layer.weight

    def merged_weight(self) -> Tensor:
        """The dense weight this layer computes with, (V, H); builds a full copy."""
        return rows_reference(self.base_layer.weight.detach(), self.token_ids, self.rows.detach())

    def extra_repr(self) -> str:
        return f"trainable_rows={self.rows.shape[0]}, vocab={self.base_layer.weight.shape[0]}"


class RowsEmbedding(_NewRows):
    """An ``nn.Embedding`` whose rows ``token_ids`` come from the trainable ``rows`` parameter.

    Args:
        base_layer: the frozen ``nn.Embedding`` (V, H), kept as ``self.base_layer``.
        token_ids: int64 (n,) distinct ids in [0, V).
        rows: a parameter (n, H) to share (tied lm_head), or None to create one initialised
            from the base rows.
        dtype: dtype of a newly created ``rows`` (default: the base weight's).

    Shapes: input_ids (...) int64 -> (..., H) in the base weight's dtype.

    Example:
        >>> emb = RowsEmbedding(nn.Embedding(100, 8), torch.tensor([98, 99]))
        >>> emb(torch.tensor([[1, 99]])).shape
        torch.Size([1, 2, 8])
    """

    def __init__(
        self,
        base_layer: nn.Embedding,
        token_ids: Tensor,
        rows: nn.Parameter | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(base_layer, token_ids, rows, dtype)
        vocab = base_layer.weight.shape[0]
        lookup = torch.full((vocab,), -1, dtype=torch.long, device=base_layer.weight.device)
        lookup[self.token_ids] = torch.arange(len(self.token_ids), device=lookup.device)
        self.register_buffer("row_of_token", lookup, persistent=False)
        self.padding_idx = base_layer.padding_idx
        self.embedding_dim = base_layer.embedding_dim
        self.num_embeddings = base_layer.num_embeddings

    def forward(self, input_ids: Tensor) -> Tensor:
        base = self.base_layer(input_ids)  # (..., H), frozen
        local = self.row_of_token[input_ids]  # (...) row index or -1
        new = F.embedding(local.clamp(min=0), self.rows).to(base.dtype)
        scale = getattr(self.base_layer, "embed_scale", None)  # Gemma-style scaled embeddings
        if scale is not None:
            new = new * scale.to(new.dtype)
        return torch.where((local >= 0).unsqueeze(-1), new, base)


class RowsLinear(_NewRows):
    """A bias-free ``nn.Linear`` head (V, H) whose output rows ``token_ids`` come from ``rows``.

    Args:
        base_layer: the frozen ``nn.Linear`` (out=V, in=H) without bias.
        token_ids: int64 (n,) distinct ids in [0, V).
        rows: a parameter (n, H) to share (tied to the input embedding), or None.
        dtype: dtype of a newly created ``rows`` (default: the base weight's).

    Shapes: x (..., H) -> logits (..., V).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        token_ids: Tensor,
        rows: nn.Parameter | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if base_layer.bias is not None:
            raise ValueError("new_rows on an lm_head with a bias is not supported")
        super().__init__(base_layer, token_ids, rows, dtype)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.register_parameter("bias", None)

    @property
    def weight(self) -> Tensor:
        """The weight this head computes with, W' (V, H): the frozen weight with the trained
        rows in place, differentiable in ``rows``. Built on each access (a (V, H) copy), for
        code that reads ``lm_head.weight`` instead of calling the layer (TRL's fused loss):
        with the frozen weight it would train nothing and score the new tokens with stale
        rows. The forward never builds it."""
        return rows_reference(self.base_layer.weight, self.token_ids, self.rows)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.base_layer.weight
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        elif x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _RowsLinearFn.apply(x, weight, self.rows, self.token_ids, self._segments)
