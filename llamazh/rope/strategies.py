"""Rotary scaling strategies: frozen dataclasses with one shared method. This module holds the
base class and the strategies that scale every frequency alike (PI, NTK family); YaRN and
Llama 3, which treat frequency bands differently, are in :mod:`llamazh.rope.band_strategies`.

Every strategy answers one question, ``inv_freq(head_dim, base, seq_len=...)``: the inverse
frequencies ``(head_dim // 2,)`` in fp32 and the factor that multiplies cos and sin (YaRN's
attention temperature; 1.0 elsewhere). ``head_dim`` is the *rotated* dimension (the head dim
times ``partial_rotary_factor``). Strategies marked ``dynamic`` depend on the current sequence
length; the others ignore ``seq_len``.

For the types transformers also implements (linear, dynamic, yarn, llama3) the arithmetic is
written operation for operation like ``transformers.modeling_rope_utils`` (transformers 5.17 to
5.23), so the results are bit-identical in fp32; the tests pin that.

Papers: position interpolation (Chen et al. 2023, arXiv:2306.15595), NTK-aware scaling (bloc97,
2023), YaRN (Peng et al. 2023, arXiv:2309.00071), Llama 3.1 (Meta, 2024); adaptive NTK from
Chinese-LLaMA-Alpaca-2 (ymcui/Chinese-LLaMA-Alpaca-2, v4.1).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ClassVar

import torch

from llamazh._checks import check_positive_float, check_positive_int

__all__ = [
    "AdaptiveNTKScaling",
    "DynamicNTKScaling",
    "LinearScaling",
    "NTKScaling",
    "NoScaling",
    "RopeScaling",
]


def _default_inv_freq(dim: int, base: float, device: torch.device | None) -> torch.Tensor:
    # transformers' exact expression: int64 arange -> fp32, python-float base ** fp32 tensor
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
    return 1.0 / (base ** (exponent / dim))


def _check_head_dim(head_dim: Any) -> int:
    check_positive_int("head_dim", head_dim, minimum=2)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got head_dim={head_dim}")
    return head_dim


def _check_seq_len(seq_len: Any) -> int | None:
    if seq_len is None:
        return None
    if isinstance(seq_len, torch.Tensor):
        raise TypeError("seq_len must be a python int (call int(t) on a tensor), got a Tensor")
    return check_positive_int("seq_len", seq_len)


def _check_at_least(name: str, value: Any, minimum: float) -> float:
    value = check_positive_float(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return value


@dataclass(frozen=True)
class RopeScaling:
    """Base class: ``inv_freq`` plus conversion to and from ``config.rope_parameters``.

    Class attributes:
        name: the registry key (``llamazh.rope.REGISTRY``).
        hf_type: transformers' ``rope_type`` for this strategy, or ``None`` when only llamazh
            implements it (then ``to_hf`` writes ``"llamazh_<name>"``, which stock
            transformers refuses to load).
    """

    name: ClassVar[str] = ""
    hf_type: ClassVar[str | None] = None
    # hf key -> dataclass field; keys are accepted by from_hf and written by to_hf
    _hf_keys: ClassVar[dict[str, str]] = {}

    @property
    def is_dynamic(self) -> bool:
        """Whether ``inv_freq`` depends on ``seq_len``."""
        return False

    @property
    def hf_native(self) -> bool:
        """Whether stock transformers implements this strategy (``to_hf`` loads without us)."""
        return not self.to_hf()["rope_type"].startswith("llamazh_")

    @property
    def original_length(self) -> int | None:
        """The length below which a dynamic strategy equals plain RoPE (``None`` if static)."""
        return None

    def inv_freq(
        self,
        head_dim: int,
        base: float,
        *,
        seq_len: int | None = None,
        device: torch.device | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Inverse frequencies ``(head_dim // 2,)`` fp32 and the cos/sin scale.

        Args:
            head_dim: the rotated dimension, even.
            base: RoPE's theta (10000 for Llama 2, 500000 for Llama 3).
            seq_len: current sequence length (used by dynamic strategies only; ``None`` means
                "not longer than the original length").
            device: where to build the tensor.

        Raises:
            ValueError / TypeError: ``head_dim`` odd or < 2, ``base`` <= 1, bad ``seq_len``.

        Example:
            >>> inv_freq, scale = LinearScaling(factor=4.0).inv_freq(128, 10000.0)
            >>> inv_freq.shape, scale
            (torch.Size([64]), 1.0)
        """
        _check_head_dim(head_dim)
        _check_at_least("base", base, 1.0)
        return self._inv_freq(head_dim, float(base), _check_seq_len(seq_len), device)

    def _inv_freq(
        self, dim: int, base: float, seq_len: int | None, device: torch.device | None
    ) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def with_defaults(self, max_position_embeddings: int) -> RopeScaling:
        """Fill fields left ``None`` that default to the model's ``max_position_embeddings``."""
        return self

    def to_hf(self) -> dict[str, Any]:
        """This strategy as ``config.rope_parameters`` entries (without ``rope_theta``).

        Example:
            >>> YaRNScaling(factor=16.0, original_max_position=4096).to_hf()["rope_type"]
            'yarn'
        """
        out: dict[str, Any] = {"rope_type": self.hf_type or f"llamazh_{self.name}"}
        if self.hf_type is None:  # stock transformers cannot build this: say who can
            out["requires"] = "llamazh"
        for key, attr in self._hf_keys.items():
            value = getattr(self, attr)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def _from_fields(cls, params: dict[str, Any]) -> RopeScaling:
        accepted = set(cls._hf_keys)
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise ValueError(
                f"rope_parameters for {cls.__name__} has unknown keys {unknown}; accepted: "
                f"{sorted(accepted | {'rope_type', 'rope_theta', 'partial_rotary_factor'})}"
            )
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        kwargs = {cls._hf_keys[k]: v for k, v in params.items()}
        missing = sorted(k for k, attr in cls._hf_keys.items() if attr in required - set(kwargs))
        if missing:
            raise ValueError(f"rope_parameters for {cls.__name__} is missing keys {missing}")
        return cls(**kwargs)


@dataclass(frozen=True)
class NoScaling(RopeScaling):
    """Plain RoPE (Su et al. 2021): ``inv_freq[i] = base ** (-2i / d)``."""

    name: ClassVar[str] = "default"
    hf_type: ClassVar[str | None] = "default"

    def _inv_freq(self, dim, base, seq_len, device):
        return _default_inv_freq(dim, base, device), 1.0


@dataclass(frozen=True)
class LinearScaling(RopeScaling):
    """Position interpolation: every frequency divided by ``factor`` (>= 1)."""

    factor: float
    name: ClassVar[str] = "linear"
    hf_type: ClassVar[str | None] = "linear"
    _hf_keys: ClassVar[dict[str, str]] = {"factor": "factor"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", _check_at_least("factor", self.factor, 1.0))

    def _inv_freq(self, dim, base, seq_len, device):
        inv_freq = _default_inv_freq(dim, base, device)
        inv_freq /= self.factor
        return inv_freq, 1.0


@dataclass(frozen=True)
class NTKScaling(RopeScaling):
    """Static NTK-aware scaling: ``base' = base * alpha ** (d / (d - 2))`` (``alpha`` >= 1)."""

    alpha: float
    name: ClassVar[str] = "ntk"
    _hf_keys: ClassVar[dict[str, str]] = {"alpha": "alpha"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _check_at_least("alpha", self.alpha, 1.0))

    def _inv_freq(self, dim, base, seq_len, device):
        return _default_inv_freq(dim, base * self.alpha ** (dim / (dim - 2)), device), 1.0


@dataclass(frozen=True)
class DynamicNTKScaling(RopeScaling):
    """transformers' dynamic NTK: for ``L > original_max_position``,
    ``base' = base * (factor * L / original - (factor - 1)) ** (d / (d - 2))``; plain RoPE below.

    The model keeps the largest length seen (grow-only) and resets below the original length;
    see ``llamazh.rope`` docs for what that does to keys already in a KV cache.
    """

    factor: float
    original_max_position: int
    name: ClassVar[str] = "dynamic"
    hf_type: ClassVar[str | None] = "dynamic"
    # transformers reads the original length from config.max_position_embeddings
    _hf_keys: ClassVar[dict[str, str]] = {"factor": "factor"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", _check_at_least("factor", self.factor, 1.0))
        check_positive_int("original_max_position", self.original_max_position)

    @property
    def is_dynamic(self) -> bool:
        return True

    @property
    def original_length(self) -> int:
        return self.original_max_position

    def _inv_freq(self, dim, base, seq_len, device):
        original = self.original_max_position
        length = original if seq_len is None else max(seq_len, original)
        base = base * ((self.factor * length / original) - (self.factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(dim, base, device), 1.0


@dataclass(frozen=True)
class AdaptiveNTKScaling(RopeScaling):
    """Chinese-LLaMA-Alpaca-2's hyper-parameter-free NTK: for ``L > original_max_position``
    (``M``), ``alpha = (L / (M / 2) - 1) * coeff`` and ``base' = base * alpha ** (d / (d - 2))``;
    plain RoPE (divided by the PI ``factor``) up to ``M``.

    ``factor`` composes position interpolation as in their 16K models (positions / factor).
    ``original_max_position=None`` means the model's ``max_position_embeddings``. With
    ``coeff=1`` and ``factor=1`` this equals :class:`DynamicNTKScaling` with factor 2.
    """

    coeff: float = 1.0
    original_max_position: int | None = None
    factor: float = 1.0
    name: ClassVar[str] = "adaptive_ntk"
    _hf_keys: ClassVar[dict[str, str]] = {
        "coeff": "coeff",
        "original_max_position_embeddings": "original_max_position",
        "factor": "factor",
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff", check_positive_float("coeff", self.coeff))
        object.__setattr__(self, "factor", _check_at_least("factor", self.factor, 1.0))
        if self.original_max_position is not None:
            check_positive_int("original_max_position", self.original_max_position, minimum=2)

    @property
    def is_dynamic(self) -> bool:
        return True

    @property
    def original_length(self) -> int | None:
        return self.original_max_position

    def with_defaults(self, max_position_embeddings):
        if self.original_max_position is not None:
            return self
        return replace(self, original_max_position=max_position_embeddings)

    def _inv_freq(self, dim, base, seq_len, device):
        original = self.original_max_position
        if original is None:
            raise ValueError(
                "AdaptiveNTKScaling.original_max_position is None: pass it, or call "
                "with_defaults(config.max_position_embeddings) first"
            )
        if seq_len is not None and seq_len > original:
            alpha = (seq_len / (original / 2) - 1) * self.coeff
            base = base * alpha ** (dim / (dim - 2))
        inv_freq = _default_inv_freq(dim, base, device)
        if self.factor != 1.0:
            inv_freq /= self.factor
        return inv_freq, 1.0
