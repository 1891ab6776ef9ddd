"""Rotary scaling strategies: frozen dataclasses with one shared method.

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

import math
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ClassVar

import torch

from llamazh._checks import check_positive_float, check_positive_int

__all__ = [
    "AdaptiveNTKScaling",
    "DynamicNTKScaling",
    "LinearScaling",
    "Llama3Scaling",
    "NTKScaling",
    "NoScaling",
    "RopeScaling",
    "YaRNScaling",
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


@dataclass(frozen=True)
class YaRNScaling(RopeScaling):
    """YaRN (arXiv:2309.00071): interpolate low frequencies by ``factor``, keep high ones, blend
    the pairs between ``beta_slow`` and ``beta_fast`` rotations over ``original_max_position``;
    cos and sin are multiplied by ``attention_factor`` (default ``0.1 ln(factor) + 1``, or the
    ``mscale / mscale_all_dim`` ratio when both are set, as in transformers).

    ``dynamic=True`` (dynamic YaRN): the scale follows the length,
    ``s = min(factor, max(1, L / original))``, so sequences up to the original length get plain
    RoPE and ``factor`` caps the stretch.
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    dynamic: bool = False
    name: ClassVar[str] = "yarn"
    hf_type: ClassVar[str | None] = "yarn"
    _hf_keys: ClassVar[dict[str, str]] = {
        "factor": "factor",
        "original_max_position_embeddings": "original_max_position",
        "beta_fast": "beta_fast",
        "beta_slow": "beta_slow",
        "mscale": "mscale",
        "mscale_all_dim": "mscale_all_dim",
        "attention_factor": "attention_factor",
        "truncate": "truncate",
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", _check_at_least("factor", self.factor, 1.0))
        check_positive_int("original_max_position", self.original_max_position)
        beta_fast = check_positive_float("beta_fast", self.beta_fast)
        beta_slow = check_positive_float("beta_slow", self.beta_slow)
        if beta_fast <= beta_slow:
            raise ValueError(
                f"beta_fast must be > beta_slow, got beta_fast={beta_fast}, beta_slow={beta_slow}"
            )
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, check_positive_float(key, getattr(self, key)))
        for key in ("truncate", "dynamic"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key} must be a bool, got {key}={getattr(self, key)!r}")

    @property
    def is_dynamic(self) -> bool:
        return self.dynamic

    @property
    def original_length(self) -> int | None:
        return self.original_max_position if self.dynamic else None

    def to_hf(self) -> dict[str, Any]:
        out = super().to_hf()
        if self.dynamic:  # transformers has no dynamic YaRN
            out.update(rope_type="llamazh_dynamic_yarn", requires="llamazh")
        return out

    def _inv_freq(self, dim, base, seq_len, device):
        factor = self.factor
        if self.dynamic:
            factor = min(factor, max(1.0, (seq_len or 0) / self.original_max_position))

        def get_mscale(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        attention_factor = self.attention_factor
        if attention_factor is None:
            if self.mscale and self.mscale_all_dim:
                num = get_mscale(factor, self.mscale)
                attention_factor = float(num / get_mscale(factor, self.mscale_all_dim))
            else:
                attention_factor = get_mscale(factor)

        def correction_dim(rotations: float) -> float:
            # the pair index whose wavelength fits `rotations` times in the original length
            ratio = self.original_max_position / (rotations * 2 * math.pi)
            return (dim * math.log(ratio)) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp

        pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (factor * pos_freqs)
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp.to(device=device, dtype=torch.float)  # 1 = extrapolate (high frequency)
        inv_freq = interpolation * (1 - keep) + extrapolation * keep
        return inv_freq, attention_factor


@dataclass(frozen=True)
class Llama3Scaling(RopeScaling):
    """Llama 3.1's scaling: wavelengths above ``original / low_freq_factor`` are divided by
    ``factor``, below ``original / high_freq_factor`` kept, smoothly blended in between."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int
    name: ClassVar[str] = "llama3"
    hf_type: ClassVar[str | None] = "llama3"
    _hf_keys: ClassVar[dict[str, str]] = {
        "factor": "factor",
        "low_freq_factor": "low_freq_factor",
        "high_freq_factor": "high_freq_factor",
        "original_max_position_embeddings": "original_max_position",
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", _check_at_least("factor", self.factor, 1.0))
        low = check_positive_float("low_freq_factor", self.low_freq_factor)
        high = check_positive_float("high_freq_factor", self.high_freq_factor)
        if high <= low:
            raise ValueError(
                f"high_freq_factor must be > low_freq_factor, got high_freq_factor={high}, "
                f"low_freq_factor={low}"
            )
        check_positive_int("original_max_position", self.original_max_position)

    def _inv_freq(self, dim, base, seq_len, device):
        inv_freq = _default_inv_freq(dim, base, device)
        old = self.original_max_position
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
