"""Strategies that treat frequency bands differently: YaRN and Llama 3.1.

Same contract as :mod:`llamazh.rope.strategies`; written operation for operation like
transformers' ``_compute_yarn_parameters`` / ``_compute_llama3_parameters`` (5.17 to 5.23) so
the fp32 results are bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from llamazh._checks import check_positive_float, check_positive_int
from llamazh.rope.strategies import RopeScaling, _check_at_least, _default_inv_freq

__all__ = ["Llama3Scaling", "YaRNScaling"]


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
        if self.dynamic and factor == 1.0:  # not stretched yet: plain RoPE to the last bit
            inv_freq = _default_inv_freq(dim, base, device)
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
