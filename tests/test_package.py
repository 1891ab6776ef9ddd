"""The package itself: version, curated API, import hygiene, the tolerance helper."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import llamazh
from llamazh.testing import assert_close, compare


def test_version_and_api():
    assert isinstance(llamazh.__version__, str)
    assert "patch" in dir(llamazh)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        llamazh.nope  # noqa: B018


def test_import_is_light():
    code = (
        "import sys, llamazh; "
        "heavy = [m for m in ('transformers', 'triton') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_patch_requires_something():
    with pytest.raises(ValueError, match=r"rope=.*attention="):
        llamazh.patch(object())


def test_tolerance_rule_reports_location():
    ref = torch.zeros(3, 4, dtype=torch.float64)
    base = torch.full((3, 4), 1e-3, dtype=torch.float16)
    act = torch.zeros(3, 4, dtype=torch.float16)
    act[1, 2] = 1e-2
    result = compare(act, ref, base)
    assert not result.ok and result.where == (1, 2)
    with pytest.raises(AssertionError, match=r"at \(1, 2\)"):
        assert_close(act, ref, base)
    assert_close(act, ref, base * 10)


def test_tolerance_rule_rejects_nan():
    ref = torch.zeros(2)
    act = torch.tensor([0.0, float("nan")])
    assert not compare(act, ref, ref).ok
