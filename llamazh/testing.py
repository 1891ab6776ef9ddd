"""Test utilities shipped with the library: the numeric tolerance rule and tiny models.

The tolerance rule (flash-attn's, written down once, used by every kernel test)::

    max|actual - reference| <= factor * max|baseline - reference| + floor

* ``reference``: the same math in higher precision (fp32 for fp16/bf16 kernels, fp64 for
  fp32 kernels);
* ``baseline``: the same math done by plain PyTorch in ``actual``'s dtype, i.e. the error a
  user already accepts when not using the kernel;
* ``factor``: 2 for outputs, 3 for gradients;
* ``floor``: ``floor_ulps`` units in the last place of ``actual``'s dtype at the scale of the
  reference (``floor_ulps * eps(dtype) * max(1, max|reference|)``), so that a baseline that
  happens to be exact does not demand an exact kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
FLOOR_ULPS = 2.0


@dataclass(frozen=True)
class Closeness:
    """The outcome of one comparison under the tolerance rule."""

    name: str
    max_error: float
    where: tuple[int, ...]
    actual_value: float
    reference_value: float
    baseline_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"{self.name}: {verdict}: max|actual - ref| = {self.max_error:.3e} at {self.where} "
            f"(actual {self.actual_value:.6g}, ref {self.reference_value:.6g}); "
            f"bound = {self.bound:.3e} (baseline error {self.baseline_error:.3e})"
        )


def compare(
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    factor: float = OUTPUT_FACTOR,
    floor_ulps: float = FLOOR_ULPS,
    name: str = "output",
) -> Closeness:
    """Measure ``actual`` against ``reference`` under the tolerance rule (module docstring).

    Args:
        actual: the tensor under test, any shape, any float dtype.
        reference: same shape, higher precision.
        baseline: same shape, same math in ``actual``'s dtype by plain PyTorch; ``None`` means
            only the floor applies (use when the baseline *is* the reference).
        factor: multiple of the baseline error allowed (2 outputs, 3 gradients).
        floor_ulps: absolute floor in ulps of ``actual.dtype`` at the reference's scale.
        name: printed in the report.
    """
    if actual.shape != reference.shape:
        raise ValueError(
            f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}"
        )
    ref = reference.detach().double().cpu()
    act = actual.detach().double().cpu()
    err = (act - ref).abs()
    if not torch.isfinite(act).all():
        bad = torch.nonzero(~torch.isfinite(act))[0].tolist()
        return Closeness(
            name,
            float("inf"),
            tuple(bad),
            float(act[tuple(bad)]),
            float(ref[tuple(bad)]),
            float("nan"),
            0.0,
        )
    base_err = 0.0
    if baseline is not None:
        base_err = (
            float((baseline.detach().double().cpu() - ref).abs().max()) if ref.numel() else 0.0
        )
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    eps = torch.finfo(actual.dtype).eps if actual.dtype.is_floating_point else 0.0
    bound = factor * base_err + floor_ulps * eps * scale
    if err.numel() == 0:
        return Closeness(name, 0.0, (), 0.0, 0.0, base_err, bound)
    flat = int(err.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
    return Closeness(
        name, float(err.max()), where, float(act[where]), float(ref[where]), base_err, bound
    )


def assert_close(
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    factor: float = OUTPUT_FACTOR,
    floor_ulps: float = FLOOR_ULPS,
    name: str = "output",
) -> Closeness:
    """:func:`compare`, raising ``AssertionError`` with the full report when the rule fails."""
    result = compare(actual, reference, baseline, factor=factor, floor_ulps=floor_ulps, name=name)
    if not result.ok:
        raise AssertionError(str(result))
    return result


def assert_grad_close(
    actual: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    name: str = "grad",
) -> Closeness:
    """:func:`assert_close` with the gradient factor (3x)."""
    return assert_close(actual, reference, baseline, factor=GRAD_FACTOR, name=name)


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference is computed in: fp64 for fp32 inputs, fp32 otherwise."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


# ---- data and tiny models ---------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_path(relative: str) -> Path | None:
    """Path of a bundled data file (``data/`` in a source checkout), or ``None`` if absent.

    Example: ``data_path("tokenizers/llama2.model")``, ``data_path("corpus/zh_d2l.txt")``.
    Falls back to ``../shared/data`` beside the checkout.
    """
    for root in (REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data"):
        candidate = root / relative
        if candidate.is_file():
            return candidate
    return None


def tiny_llama_config(**overrides: Any) -> Any:
    """A ``LlamaConfig`` small enough for CPU tests (2 layers, hidden 64, 4 heads, 2 KV heads).

    Keyword arguments override any field (``vocab_size=...``, ``rope_parameters=...``).
    """
    from transformers import LlamaConfig

    fields: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` from :func:`tiny_llama_config`, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.to(dtype).eval()


_FAMILIES = ("llama", "mistral", "qwen2")


def tiny_causal_lm(
    family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Any:
    """A random tiny causal LM of a Llama-structured family, in eval mode.

    Args:
        family: ``"llama"``, ``"mistral"`` or ``"qwen2"``; the shape is
            :func:`tiny_llama_config`'s (``overrides`` replace any field, e.g.
            ``num_attention_heads=9, num_key_value_heads=3, hidden_size=72`` for GQA 3:1).
        seed: torch seed for the weights.

    Example:
        >>> model = tiny_causal_lm("qwen2", num_attention_heads=9, num_key_value_heads=3,
        ...                        hidden_size=72)
    """
    import transformers

    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {_FAMILIES}, got family={family!r}")
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    fields = tiny_llama_config().to_dict()
    fields = {
        k: fields[k]
        for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        )
    }  # fmt: skip
    fields.update(overrides)
    config = getattr(transformers, f"{prefix}Config")(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    return model.to(dtype).eval()
