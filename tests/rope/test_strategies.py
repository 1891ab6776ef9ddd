"""Strategies: bit-exact agreement with transformers, snapshots, properties, strict parsing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.rope import (
    REGISTRY,
    AdaptiveNTKScaling,
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    NoScaling,
    NTKScaling,
    YaRNScaling,
    from_hf,
)

head_dims = st.sampled_from([8, 32, 48, 64, 80, 96, 128, 160, 256])
bases = st.sampled_from([10000.0, 500000.0, 1e6]) | st.floats(100.0, 2e6)
factors = st.sampled_from([1.0, 2.0, 4.0, 16.0]) | st.floats(1.0, 64.0)
originals = st.sampled_from([256, 2048, 4096, 8192]) | st.integers(16, 32768)


def _same(ours, theirs):
    inv_ours, scale_ours = ours
    inv_theirs, scale_theirs = theirs
    assert inv_ours.dtype == torch.float32 == inv_theirs.dtype
    assert torch.equal(inv_ours, inv_theirs), (inv_ours - inv_theirs).abs().max()
    assert scale_ours == scale_theirs


@given(head_dim=head_dims, base=bases, factor=factors)
def test_linear_matches_transformers(hf_inv_freq, head_dim, base, factor):
    theirs = hf_inv_freq(
        {"rope_type": "linear", "factor": factor}, head_dim=head_dim, base=base, max_position=4096
    )
    _same(LinearScaling(factor).inv_freq(head_dim, base), theirs)


@given(head_dim=head_dims, base=bases, factor=factors, original=originals, data=st.data())
def test_dynamic_matches_transformers(hf_inv_freq, head_dim, base, factor, original, data):
    seq_len = data.draw(st.none() | st.integers(1, 8 * original), label="seq_len")
    theirs = hf_inv_freq(
        {"rope_type": "dynamic", "factor": factor},
        head_dim=head_dim, base=base, max_position=original, seq_len=seq_len,
    )  # fmt: skip
    _same(DynamicNTKScaling(factor, original).inv_freq(head_dim, base, seq_len=seq_len), theirs)


@given(
    head_dim=head_dims, base=bases, factor=factors, original=originals,
    betas=st.sampled_from([(32.0, 1.0), (64.0, 2.0), (8.0, 0.5)]),
    mscales=st.sampled_from([(None, None), (1.0, 1.0), (0.707, 0.707), (1.0, 0.0), (2.0, 1.0)]),
    attention_factor=st.none() | st.floats(0.5, 2.0), truncate=st.booleans(),
)  # fmt: skip
def test_yarn_matches_transformers(
    hf_inv_freq, head_dim, base, factor, original, betas, mscales, attention_factor, truncate
):
    mscale, mscale_all_dim = mscales
    mscale_all_dim = mscale_all_dim or None
    ours = YaRNScaling(
        factor, original, beta_fast=betas[0], beta_slow=betas[1], mscale=mscale,
        mscale_all_dim=mscale_all_dim, attention_factor=attention_factor, truncate=truncate,
    )  # fmt: skip
    theirs = hf_inv_freq(ours.to_hf(), head_dim=head_dim, base=base, max_position=original)
    _same(ours.inv_freq(head_dim, base), theirs)


@given(
    head_dim=head_dims, base=bases, factor=factors, original=originals,
    freq_factors=st.sampled_from([(1.0, 4.0), (2.0, 8.0), (0.5, 1.5)]),
)  # fmt: skip
def test_llama3_matches_transformers(hf_inv_freq, head_dim, base, factor, original, freq_factors):
    ours = Llama3Scaling(factor, *freq_factors, original)
    theirs = hf_inv_freq(ours.to_hf(), head_dim=head_dim, base=base, max_position=original * 2)
    _same(ours.inv_freq(head_dim, base), theirs)


@given(head_dim=head_dims, base=bases)
def test_default_matches_transformers(head_dim, base):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": base},
    )  # fmt: skip
    _same(NoScaling().inv_freq(head_dim, base), LlamaRotaryEmbedding(config=config)
          .compute_default_rope_parameters(config))  # fmt: skip


# ---- properties ---------------------------------------------------------------------------


@given(head_dim=head_dims, base=bases, factor=factors)
def test_linear_is_default_over_factor(head_dim, base, factor):
    plain, _ = NoScaling().inv_freq(head_dim, base)
    assert torch.equal(LinearScaling(factor).inv_freq(head_dim, base)[0], plain / factor)


@given(head_dim=head_dims, base=bases, factor=factors, original=originals, data=st.data())
def test_dynamic_is_default_up_to_original(head_dim, base, factor, original, data):
    seq_len = data.draw(st.integers(1, original))
    plain, _ = NoScaling().inv_freq(head_dim, base)
    ours, scale = DynamicNTKScaling(factor, original).inv_freq(head_dim, base, seq_len=seq_len)
    assert torch.equal(ours, plain) and scale == 1.0


@given(head_dim=head_dims, base=bases, factor=factors, original=originals, data=st.data())
def test_dynamic_yarn_is_yarn_at_the_current_stretch(head_dim, base, factor, original, data):
    seq_len = data.draw(st.integers(1, 8 * original), label="seq_len")
    ours = YaRNScaling(factor, original, dynamic=True).inv_freq(head_dim, base, seq_len=seq_len)
    stretch = min(factor, max(1.0, seq_len / original))  # s = L / L_orig, capped by factor
    if stretch > 1.0:
        _same(ours, YaRNScaling(stretch, original).inv_freq(head_dim, base))
    else:  # within the original length (or factor 1): exactly plain RoPE
        _same(ours, NoScaling().inv_freq(head_dim, base))


@given(head_dim=head_dims, base=bases, factor=factors, original=originals)
def test_yarn_between_interpolation_and_extrapolation(head_dim, base, factor, original):
    plain, _ = NoScaling().inv_freq(head_dim, base)
    ours, scale = YaRNScaling(factor, original).inv_freq(head_dim, base)
    tol = 1e-6 * plain  # one fp32 rounding of the blend
    assert (ours <= plain + tol).all() and (ours >= plain / factor - tol).all()
    assert (ours[1:] <= ours[:-1]).all()  # still a decreasing spectrum
    assert ours[0] == plain[0]  # the fastest pair is never interpolated
    assert scale == pytest.approx(0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


@given(head_dim=head_dims, base=bases, data=st.data())
def test_adaptive_ntk_coeff_one_is_dynamic_factor_two(head_dim, base, data):
    original = data.draw(st.integers(8, 16384).map(lambda n: 2 * n), label="original")
    seq_len = data.draw(st.integers(1, 8 * original), label="seq_len")
    adaptive = AdaptiveNTKScaling(coeff=1.0, original_max_position=original)
    dynamic = DynamicNTKScaling(2.0, original)
    _same(
        adaptive.inv_freq(head_dim, base, seq_len=seq_len),
        dynamic.inv_freq(head_dim, base, seq_len=seq_len),
    )


def test_adaptive_ntk_composes_with_linear():
    pi = AdaptiveNTKScaling(original_max_position=4096, factor=4.0)
    assert torch.equal(pi.inv_freq(128, 1e4)[0], LinearScaling(4.0).inv_freq(128, 1e4)[0])
    longer = pi.inv_freq(128, 1e4, seq_len=8192)[0]
    alpha = 8192 / 2048 - 1
    assert torch.equal(longer, NTKScaling(alpha).inv_freq(128, 1e4)[0] / 4.0)


def test_ntk_is_default_with_a_larger_base():
    ntk, _ = NTKScaling(alpha=8.0).inv_freq(128, 10000.0)
    assert torch.equal(ntk, NoScaling().inv_freq(128, 10000.0 * 8.0 ** (128 / 126))[0])


def test_snapshots():
    """Numbers pinned independently of transformers (head dim 128, base 10000)."""
    inv, scale = YaRNScaling(16.0, 4096).inv_freq(128, 10000.0)
    # the seed's 64K model: blend over pairs 20..46 and attention scale 1 + 0.1 ln 16
    assert scale == pytest.approx(1.2772588722239781)
    plain, _ = NoScaling().inv_freq(128, 10000.0)
    assert torch.equal(inv[:20], plain[:20])
    assert torch.allclose(inv[46:], plain[46:] / 16.0, rtol=1e-6, atol=0)
    assert not torch.allclose(inv[20:46], plain[20:46]) and (inv[21:46] > plain[21:46] / 16).all()
    # pair 33 sits halfway up the ramp (33 - 20) / (46 - 20): half interpolated, half kept
    assert inv[33].item() == pytest.approx((0.5 / 16 + 0.5) * 10 ** (-4 * 66 / 128), rel=1e-6)
    dyn, _ = DynamicNTKScaling(2.0, 4096).inv_freq(128, 10000.0, seq_len=8192)
    assert dyn[-1].item() == pytest.approx(1.0 / (10000.0 * 3.0 ** (128 / 126)) ** (126 / 128))
    l3, _ = Llama3Scaling(8.0, 1.0, 4.0, 8192).inv_freq(128, 500000.0)
    # longest wavelengths are divided by the factor, the shortest kept
    assert l3[0].item() == 1.0
    assert l3[-1].item() == pytest.approx(500000.0 ** (-126 / 128) / 8.0, rel=1e-6)


# ---- conversion and strictness ------------------------------------------------------------

ALL = [
    NoScaling(),
    LinearScaling(4.0),
    NTKScaling(4.0),
    DynamicNTKScaling(2.0, 4096),
    AdaptiveNTKScaling(coeff=1.1, original_max_position=4096, factor=2.0),
    YaRNScaling(16.0, 4096, mscale=0.707, mscale_all_dim=0.707),
    YaRNScaling(8.0, 256, dynamic=True),
    Llama3Scaling(8.0, 1.0, 4.0, 8192),
]


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: type(s).__name__)
def test_round_trip(strategy):
    params = {**strategy.to_hf(), "rope_theta": 1e4}
    assert from_hf(params, max_position_embeddings=4096) == strategy
    known = params["rope_type"] in ("default", "linear", "dynamic", "yarn", "llama3")
    assert known == ("requires" not in params)
    assert REGISTRY[strategy.name] is type(strategy)


def test_seed_configs_parse():
    sixteen_k = from_hf({"type": "linear", "factor": 4.0}, max_position_embeddings=16384)
    assert sixteen_k == LinearScaling(4.0)
    sixty_four_k = from_hf(
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}
    )
    assert sixty_four_k == YaRNScaling(16.0, 4096)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"rope_type": "linear", "factor": 4.0, "beta": 1}, ValueError, r"unknown keys \['beta'\]"),
        ({"rope_type": "linear"}, ValueError, r"missing keys \['factor'\]"),
        ({"rope_type": "linear", "factor": 0.5}, ValueError, r"factor must be >= 1.0"),
        ({"rope_type": "linear", "factor": "4"}, TypeError, r"factor must be a number"),
        ({"rope_type": "longrope"}, ValueError, r"rope_type.*must be one of"),
        ({"rope_type": "dynamic", "factor": 2.0}, ValueError, r"max_position_embeddings"),
        ({"rope_type": "yarn", "factor": 4.0}, ValueError, r"original_max_position_embeddings"),
        (
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 1.0,
                "beta_slow": 2.0,
            },
            ValueError,
            r"beta_fast must be > beta_slow",
        ),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
            ValueError,
            r"high_freq_factor must be > low_freq_factor",
        ),
        ({"rope_type": "llamazh_ntk", "alpha": -1.0}, ValueError, r"alpha must be > 0"),
        ("linear", TypeError, r"rope_parameters must be a dict"),
    ],
)
def test_from_hf_is_strict(params, error, match):
    with pytest.raises(error, match=match):
        from_hf(params)


def test_inv_freq_checks_arguments():
    with pytest.raises(ValueError, match="head_dim must be even, got head_dim=7"):
        NoScaling().inv_freq(7, 1e4)
    with pytest.raises(TypeError, match="seq_len must be a python int"):
        DynamicNTKScaling(2.0, 16).inv_freq(8, 1e4, seq_len=torch.tensor(4))
    with pytest.raises(ValueError, match="original_max_position is None"):
        AdaptiveNTKScaling().inv_freq(8, 1e4, seq_len=100)
