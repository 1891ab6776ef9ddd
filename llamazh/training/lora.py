"""LoRA wrapping an existing ``nn.Linear``: ``y = base(x) + B(A(dropout(x))) * alpha / r``.

The wrapper keeps the original layer (``base_layer``) untouched and frozen, and names its two
factors ``lora_A`` (r, in) and ``lora_B`` (out, r) like PEFT, so that the model's state dict
keys (``...q_proj.base_layer.weight``, ``...q_proj.lora_A.weight``) line up with PEFT's and an
adapter file needs no key translation beyond PEFT's ``base_model.model.`` prefix.

Reference: Hu et al., LoRA (https://arxiv.org/abs/2106.09685); scaling ``alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA (https://arxiv.org/abs/2312.03732).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamazh._checks import check_positive_float, check_positive_int


def lora_scaling(rank: int, alpha: float, *, rslora: bool = False) -> float:
    """The factor multiplying ``B @ A``: ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """The dense weight update ``B @ A * scaling`` in fp32: (out, r) @ (r, in) -> (out, in).

    This is what merging adds to the base weight; done in fp32 whatever the factors' dtype so
    that a bf16/fp16 base receives a correctly rounded update.
    """
    return (lora_b.float() @ lora_a.float()) * scaling


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base_layer: the layer to wrap, kept as ``self.base_layer`` (weights not copied).
        rank: r >= 1.
        alpha: scaling numerator (update = ``B @ A * alpha / r``).
        dropout: dropout probability on the LoRA branch input (training mode only).
        rslora: use ``alpha / sqrt(r)``.
        dtype: dtype of the factors; default fp32 (the base may be bf16/fp16: the branch casts
            its input to this dtype and its output back, as PEFT does).

    Shapes: input (..., in_features) -> output (..., out_features).

    Example:
        >>> layer = LoRALinear(nn.Linear(64, 32), rank=8, alpha=16)
        >>> layer(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"base_layer must be an nn.Linear, got base_layer={type(base_layer).__name__}"
            )
        check_positive_int("rank", rank)
        check_positive_float("alpha", alpha)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={dropout}")
        self.base_layer = base_layer
        self.rank = rank
        self.alpha = float(alpha)
        self.rslora = rslora
        self.scaling = lora_scaling(rank, self.alpha, rslora=rslora)
        device = base_layer.weight.device
        dtype = dtype or base_layer.weight.dtype
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(
            base_layer.in_features, rank, bias=False, device=device, dtype=dtype
        )
        self.lora_B = nn.Linear(
            rank, base_layer.out_features, bias=False, device=device, dtype=dtype
        )
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:
        """The frozen base weight (so code that reads ``proj.weight.dtype`` keeps working)."""
        return self.base_layer.weight

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0 (starts as a no-op)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        """``B @ A * scaling`` in fp32, shape (out_features, in_features)."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        branch_dtype = self.lora_A.weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            branch_dtype = x.dtype  # let autocast pick the matmul dtype
        h = self.lora_dropout(x.to(branch_dtype))
        update = F.linear(F.linear(h, self.lora_A.weight), self.lora_B.weight) * self.scaling
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"
