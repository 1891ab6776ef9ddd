"""How the rows a vocabulary extension adds are initialised: a registry of small strategies.

Each strategy is a frozen dataclass with one method of a shared signature,
``rows(weight, pieces, *, generator=None) -> (K, D)``: ``weight`` is the old matrix (input
embedding or lm_head, ``(V_old, D)``) and ``pieces[k]`` the old ids the old tokenizer splits
new token ``k`` into (``None`` when the token has no text, e.g. a control token). Means are
taken in fp32; the caller casts.

* :class:`MeanRows` (``"mean"``): the mean of all old rows (Hewitt 2021: it bounds the change
  of the old tokens' distribution by ``log(1 + K/V)``).
* :class:`PieceRows` (``"subword_mean"``): the mean of the pieces' rows (FVT).
* :class:`PieceRows` with ``decay`` (``"last_heavy"``, ``"first_heavy"``): piece ``i`` of ``k``
  weighted ``exp(decay * i)``: an input row leaning on the last piece (the state a model is
  in after reading a word is mostly its last piece's), an output row on the first (the
  logit that predicts a word is mostly its first piece's); EEVE (arXiv:2402.14714) and
  AdaptiVocab (arXiv:2503.19693) use these two shapes.
* :class:`NormalRows` (``"normal"``): ``N(0, std**2)`` as a freshly built model would hold.

Example:
    >>> init = get_row_init("last_heavy")
    >>> init.rows(torch.eye(4), [[0, 1], None]).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ROW_INITS",
    "MeanRows",
    "NormalRows",
    "PieceRows",
    "RowInit",
    "get_row_init",
]


@dataclass(frozen=True)
class RowInit:
    """Base class: ``rows(weight (V, D), pieces) -> (len(pieces), D)`` in fp32."""

    def rows(
        self,
        weight: Tensor,
        pieces: list[list[int] | None],
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        raise NotImplementedError

    @property
    def uses_pieces(self) -> bool:
        """Whether :meth:`rows` reads ``pieces`` (the caller may skip splitting otherwise)."""
        return False


@dataclass(frozen=True)
class MeanRows(RowInit):
    """Every new row is the mean of all old rows."""

    def rows(self, weight, pieces, *, generator=None):  # type: ignore[override]
        mean = weight.detach().float().mean(dim=0)  # (D,)
        return mean.expand(len(pieces), -1).clone()  # (K, D)


@dataclass(frozen=True)
class PieceRows(RowInit):
    """A weighted mean of the pieces' rows: piece ``i`` of ``k`` weighs ``exp(decay * i)``.

    ``decay = 0`` is the plain sub-word mean; ``> 0`` leans on the last piece, ``< 0`` on the
    first. A token without pieces gets the mean of all old rows.
    """

    decay: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.decay):
            raise ValueError(f"decay must be finite, got decay={self.decay}")

    @property
    def uses_pieces(self) -> bool:
        return True

    def rows(self, weight, pieces, *, generator=None):  # type: ignore[override]
        old = weight.detach().float()  # (V, D)
        out = old.mean(dim=0).expand(len(pieces), -1).clone()  # (K, D)
        flat, seg, wts, totals = [], [], [], [0.0] * len(pieces)
        for k, ids in enumerate(pieces):
            for i in range(len(ids or ())):
                # the largest weight is 1 (no overflow); decay 0 gives a plain sum / count
                shift = i - len(ids) + 1 if self.decay > 0 else i
                w = math.exp(self.decay * shift)
                flat.append(ids[i])
                seg.append(k)
                wts.append(w)
                totals[k] += w
        if flat:
            seg_t = torch.tensor(seg, device=old.device)
            picked = old[torch.tensor(flat, device=old.device)]  # (P, D)
            if self.decay != 0:
                picked = picked * torch.tensor(wts, device=old.device).unsqueeze(1)
            sums = torch.zeros_like(out).index_add_(0, seg_t, picked)
            total = torch.tensor(totals, device=old.device)
            has = total > 0
            out[has] = sums[has] / total[has].unsqueeze(1)
        return out


@dataclass(frozen=True)
class NormalRows(RowInit):
    """I.i.d. ``N(0, std**2)`` rows (``std=None``: the std of the old rows' entries)."""

    std: float | None = None

    def rows(self, weight, pieces, *, generator=None):  # type: ignore[override]
        std = float(weight.detach().float().std()) if self.std is None else self.std
        draw = torch.randn(len(pieces), weight.shape[1], generator=generator)
        return (draw * std).to(weight.device)


#: name -> strategy; ``resize_embeddings(init=...)`` takes a name or a :class:`RowInit`.
ROW_INITS: dict[str, RowInit] = {
    "mean": MeanRows(),
    "subword_mean": PieceRows(0.0),
    "last_heavy": PieceRows(2.0),
    "first_heavy": PieceRows(-2.0),
    "normal": NormalRows(),
}


def get_row_init(name: str | RowInit, argument: str = "init") -> RowInit:
    """The strategy registered as ``name`` (a :class:`RowInit` passes through).

    Raises:
        ValueError: ``name`` is not registered (the message lists the names).
        TypeError: ``name`` is neither a string nor a :class:`RowInit`.
    """
    if isinstance(name, RowInit):
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"{argument} must be a name from ROW_INITS or a RowInit, got {type(name).__name__}"
        )
    if name not in ROW_INITS:
        listed = ", ".join(repr(k) for k in ROW_INITS)
        raise ValueError(
            f"{argument} must be one of {listed} or a RowInit; got {argument}={name!r}"
        )
    return ROW_INITS[name]
