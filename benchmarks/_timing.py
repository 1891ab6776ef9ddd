"""Timing helpers shared by the GPU benchmarks (``attention.py``, ``rope_kernel.py``,
``gpu_suite.py``): the median time of a callable and the git revision for the tables.

On CUDA the time is Triton's ``do_bench`` (CUDA events, L2 flushed before every repeat, the
median asked for where this Triton version supports it); elsewhere (the suite's CPU smoke run)
a plain wall-clock median, which is only good for checking that the code runs.
"""

from __future__ import annotations

import inspect
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def median_ms(
    fn: Callable[[], object], *, warmup: int = 25, rep: int = 100, cuda: bool = True
) -> float:
    """Median milliseconds of one ``fn()`` call.

    Args:
        fn: the work to time (launches device work; no host sync needed inside).
        warmup, rep: milliseconds of warm-up and of timed repeats (``do_bench``'s meaning).
        cuda: time with ``triton.testing.do_bench``; ``False`` times on the host clock (a few
            calls; for CPU smoke runs only).

    Example:
        >>> ms = median_ms(lambda: a @ b, warmup=10, rep=50)
    """
    if not cuda:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    kwargs: dict = {"warmup": warmup, "rep": rep}
    if "return_mode" in inspect.signature(do_bench).parameters:
        kwargs["return_mode"] = "median"
    else:  # older Triton: the 0.5 quantile is the median
        kwargs["quantiles"] = [0.5]
    ms = do_bench(fn, **kwargs)
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def git_sha() -> str:
    """Short SHA of the checkout (``unknown`` outside git), plus ``+dirty`` for local edits;
    ``LLAMAZH_GIT_SHA`` overrides it (a copy of the tree without its ``.git``, say)."""
    if os.environ.get("LLAMAZH_GIT_SHA"):
        return os.environ["LLAMAZH_GIT_SHA"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"
    return (sha or "unknown") + ("+dirty" if sha and dirty else "")
