"""The thin RotaryEmbedding module: owns the frequencies, grows and resets dynamic ones."""

from __future__ import annotations

import pytest
import torch

from llamazh.rope import (
    DynamicNTKScaling,
    LinearScaling,
    NoScaling,
    RotaryEmbedding,
    apply_rotary_reference,
    rope_cos_sin,
)


def test_module_equals_the_functions():
    rope = RotaryEmbedding(32, strategy=LinearScaling(4.0), layout="bhsd")
    q, k = torch.randn(2, 4, 9, 32), torch.randn(2, 2, 9, 32)
    q_out, k_out = rope(q, k)
    inv_freq, _ = NoScaling().inv_freq(32, 10000.0)
    cos, sin = rope_cos_sin(inv_freq / 4.0, torch.arange(9))
    assert torch.equal(q_out, apply_rotary_reference(q, cos, sin, layout="bhsd"))
    assert torch.equal(k_out, apply_rotary_reference(k, cos, sin, layout="bhsd"))
    assert list(dict(rope.named_buffers())) == ["inv_freq", "original_inv_freq"]
    assert rope.state_dict() == {}  # derived from the strategy: nothing to save


def test_dynamic_grows_and_resets_like_transformers():
    strategy = DynamicNTKScaling(2.0, 16)
    rope = RotaryEmbedding(16, strategy=strategy)
    plain = rope.inv_freq.clone()
    q = torch.randn(1, 40, 1, 16)
    rope(q)
    assert rope.max_seq_len_cached == 40
    assert torch.equal(rope.inv_freq, strategy.inv_freq(16, 1e4, seq_len=40)[0])
    rope(q[:, :30])  # shorter but still long: grow-only keeps the 40-token frequencies
    assert torch.equal(rope.inv_freq, strategy.inv_freq(16, 1e4, seq_len=40)[0])
    rope(q[:, :10])  # back within the original length: original frequencies
    assert torch.equal(rope.inv_freq, plain) and rope.max_seq_len_cached == 16


def test_module_checks_strategy():
    with pytest.raises(TypeError, match=r"strategy must be a llamazh\.rope strategy"):
        RotaryEmbedding(16, strategy="linear")


def test_importing_the_strategies_is_light():
    import subprocess
    import sys

    code = (
        "import sys; from llamazh.rope import NoScaling, LinearScaling, NTKScaling, "
        "DynamicNTKScaling, AdaptiveNTKScaling, YaRNScaling, Llama3Scaling, from_hf; "
        "print(','.join(m for m in ('transformers', 'triton') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_tables_are_computed_in_fp32_then_cast():
    """A bf16 angle at position ~4,000 is off by radians: the math must stay fp32."""
    inv_freq, _ = NoScaling().inv_freq(64, 1e4)
    positions = torch.arange(4000, 4096)
    cos, sin = rope_cos_sin(inv_freq, positions, dtype=torch.bfloat16)
    cos32, sin32 = rope_cos_sin(inv_freq, positions)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos32.dtype == torch.float32
    assert torch.equal(cos, cos32.to(torch.bfloat16)) and torch.equal(sin, sin32.to(torch.bfloat16))
    angles_bf16 = positions[:, None].to(torch.bfloat16) * inv_freq.to(torch.bfloat16)
    naive = torch.cat((angles_bf16, angles_bf16), dim=-1).cos()
    assert (naive.float() - cos32).abs().max() > 0.5  # what computing in bf16 would give
