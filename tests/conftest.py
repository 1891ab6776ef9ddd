"""Shared pytest configuration.

* Triton kernels run under the interpreter when there is no CUDA device: TRITON_INTERPRET
  must be set before Triton is first imported, which is why it happens here.
* ``@pytest.mark.gpu`` tests are skipped with a reason on machines without CUDA.
* Deprecations are errors: a ``FutureWarning``/``DeprecationWarning`` saying "deprecated"
  (``filterwarnings`` in pyproject.toml) or a transformers/peft log record saying so (the
  fixture below) fails the test that caused it, so a removal transformers announces fails CI
  the day it is announced, not the day it ships.
* Hypothesis runs derandomized (fixed seeds) with no deadline; the ``ci`` profile keeps the
  example counts small enough for 2 CPU cores, the ``gpu`` profile (set by the GPU suite)
  smaller still, since there each new example can mean new kernel compiles.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# a bare GPU machine compiles every new kernel variant (~2 s each) and each example of a
# kernel test can be a new variant: benchmarks/gpu_suite.py runs the tests with this profile
settings.register_profile(
    "gpu",
    max_examples=4,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("LLAMAZH_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel tests put their tensors: CUDA if present, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def llama2_model_path():
    """The Llama-2 SentencePiece model bundled under data/ (skips if absent)."""
    from llamazh.testing import data_path

    path = data_path("tokenizers/llama2.model")
    if path is None:
        pytest.skip("data/tokenizers/llama2.model is not in this checkout")
    return path


@pytest.fixture(scope="session")
def corpus_path():
    """A function: name -> path of a bundled corpus file (skips if absent)."""
    from llamazh.testing import data_path

    def find(name: str):
        path = data_path(f"corpus/{name}")
        if path is None:
            pytest.skip(f"data/corpus/{name} is not in this checkout")
        return path

    return find


def _first_caller_outside(skip: tuple[str, ...]) -> str:
    """The module of the innermost frame on the current stack that is not in ``skip``."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(skip):
            return module
        frame = frame.f_back
    return ""


class _DeprecationRecords(logging.Handler):
    """Collects deprecations that transformers/peft *log* (``logger.warning_once`` is how
    transformers announces some of them, e.g. the ``past_key_values`` -> ``cache`` rename),
    when the call that triggered them came from llamazh or the tests, not from peft's or
    transformers' own internals."""

    _INTERNAL = ("logging", "transformers", "torch", "peft", "accelerate", "functools")
    # logged deprecations that transformers' own code triggers deep inside a call we make
    # correctly (assisted generation calls the assistant's generate with both a
    # generation_config and generation kwargs, transformers 5.24)
    _THEIRS = ("Passing `generation_config` together with generation-related arguments",)

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" not in message.lower() or message.startswith(self._THEIRS):
            return
        caller = _first_caller_outside(self._INTERNAL)
        if caller.startswith(("llamazh", "tests", "test_")) or "conftest" in caller:
            self.messages.append(f"{record.name}: {message} (called from {caller})")


@pytest.fixture(autouse=True)
def _deprecations_fail_the_test():
    handler = _DeprecationRecords()
    loggers = [logging.getLogger(name) for name in ("transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    yield
    for logger in loggers:
        logger.removeHandler(handler)
    if handler.messages:
        pytest.fail("deprecated use of transformers/peft:\n" + "\n".join(handler.messages))
