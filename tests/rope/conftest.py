"""Shared helpers for the rope tests: transformers' oracle for inverse frequencies."""

from __future__ import annotations

import pytest


def _hf_inv_freq(rope_parameters, *, head_dim, base, max_position, seq_len=None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {**rope_parameters, "rope_theta": base}
    config = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_position,
        rope_parameters=params,
    )
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len=seq_len)


@pytest.fixture(scope="session")
def hf_inv_freq():
    """(rope_parameters, head_dim=, base=, max_position=, seq_len=) -> transformers' result."""
    return _hf_inv_freq
