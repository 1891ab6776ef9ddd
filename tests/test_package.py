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


def test_lowest_constraints_agree_with_pyproject():
    """.ci/constraints-lowest.txt pins exactly the lower bounds pyproject.toml declares."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    constraints = root / ".ci" / "constraints-lowest.txt"
    if not constraints.is_file():
        pytest.skip(".ci/constraints-lowest.txt is not in this checkout")
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + [r for group in extras.values() for r in group]
    lower = {}
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[.*\])?.*?>=\s*([0-9][^,;\s]*)", requirement)
        if match:
            lower[match.group(1).lower()] = match.group(2)
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    for name, version in pins.items():
        if name not in lower:
            continue  # a transitive pin (huggingface-hub): transformers' own lower bound
        assert tuple(map(int, lower[name].split("."))) == tuple(
            map(int, version.split(".")[: len(lower[name].split("."))])
        ), f"{name}: pyproject says >={lower[name]}, constraints pin {version}"
    assert {"transformers", "peft", "tokenizers"} <= pins.keys()
