"""``LLAMAZH_TUNE_CONFIGS`` caps how many configs one autotuning tries (after the head-dim
pruning, in list order); unset means all of them."""

from __future__ import annotations

import pytest

from llamazh.kernels import flash_attn_fwd
from llamazh.kernels.flash_attn_fwd import TUNE_CONFIGS_ENV, make_configs, tile_pruner

CONFIGS = make_configs([(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)])


@pytest.mark.parametrize(
    "cap, block_d, expected",
    [
        ("", 128, [128, 128, 64, 32]),  # unset: every config that fits
        ("0", 128, [128, 128, 64, 32]),
        ("2", 128, [128, 128]),
        ("1", 256, [64]),  # head-dim pruning first, then the cap
        ("9", 512, [32]),  # nothing fits: the smallest config stays
    ],
)
def test_cap_applies_after_the_head_dim_pruning(monkeypatch, cap, block_d, expected):
    monkeypatch.setenv(TUNE_CONFIGS_ENV, cap)
    prune = tile_pruner("BLOCK_M", 128 * 128)
    kept = prune(CONFIGS, {}, BLOCK_D=block_d)
    assert [c.kwargs["BLOCK_M"] for c in kept] == expected


def test_bad_cap_names_the_variable(monkeypatch):
    monkeypatch.setenv(TUNE_CONFIGS_ENV, "two")
    with pytest.raises(ValueError, match=TUNE_CONFIGS_ENV):
        flash_attn_fwd.tune_cap()
