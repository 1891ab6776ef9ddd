"""The child process of ``gpu_suite.py``: runs its parts in order and reports events.

Events are JSON lines appended to ``--events`` (read by the parent): ``meta``, ``start``,
``row``, ``note``, ``group`` (a process group the parent must also kill) and ``end``. After
each part on CUDA the device is checked with a tiny kernel; if a sticky error (an illegal
address, say) broke the CUDA context, the child exits with ``EXIT_RESTART`` and the parent
starts a fresh one for the parts that are left.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXIT_RESTART = 3


class Skip(Exception):
    """Raised by a part that cannot run here; the message is the reason."""


class Ctx:
    """What a part sees: its deadline, the device, the timer, and where results go."""

    def __init__(self, events: Path, part: str, soft: float, cuda: bool, smoke: bool):
        self.events, self.part, self.soft = events, part, soft
        self.cuda, self.smoke = cuda, smoke
        self.device = "cuda" if cuda else "cpu"
        self.status = "ok"
        self.errors = 0

    def emit(self, **event) -> None:
        with open(self.events, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, default=str) + "\n")

    def add(
        self,
        case: str,
        provider: str,
        metric: str,
        value: float,
        unit: str,
        note: str = "",
        **params,
    ) -> None:
        """One measurement (``value`` NaN with ``note`` for a failed case)."""
        value = float(value)
        row = dict(
            part=self.part,
            case=case,
            provider=provider,
            metric=metric,
            value=float(f"{value:.5g}") if math.isfinite(value) else value,
            unit=unit,
            note=note,
            **params,
        )
        self.emit(event="row", row=row)
        shown = f"{value:10.2f}" if math.isfinite(value) else f"{'-':>10}"
        print(
            f"  {self.part:>15} | {case:32} | {provider:22} | {shown} {unit:8} {note}", flush=True
        )

    def failed(
        self, case: str, provider: str, metric: str, unit: str, exc: BaseException, **params
    ) -> None:
        """Record a case that raised; the part goes on."""
        self.errors += 1
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        self.add(case, provider, metric, float("nan"), unit, note=f"error: {text}", **params)
        if self.errors <= 3:  # the first few in full, in the log
            traceback.print_exception(type(exc), exc, exc.__traceback__, limit=6)

    def note(self, text: str) -> None:
        print(f"  {self.part:>15} | note: {text}", flush=True)
        self.emit(event="note", part=self.part, text=text)

    def left(self) -> float:
        return self.soft - time.time()

    def expired(self, next_case: str) -> bool:
        """Whether the slice is spent; if so, mark the part cut before ``next_case``."""
        if time.time() < self.soft:
            return False
        if self.status == "ok":
            self.status = f"cut at its slice, before {next_case}"
            self.note(f"slice spent: cut before {next_case}")
        return True

    def time_ms(self, fn, warmup: int = 10, rep: int = 60) -> float:
        from _timing import median_ms

        return median_ms(fn, warmup=warmup, rep=rep, cuda=self.cuda)


class WarmCtx(Ctx):
    """A :class:`Ctx` that runs each case once, untimed, and keeps nothing: the warm-up
    process runs the benchmark parts this way while the tests run, so that their kernels are
    in Triton's (and inductor's) disk caches when the timed parts need them."""

    def emit(self, **event) -> None:
        pass

    def add(self, case, provider, metric, value, unit, note="", **params) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def failed(self, case, provider, metric, unit, exc, **params) -> None:
        print(f"warm-up {self.part} {case} {provider}: {type(exc).__name__}", flush=True)

    def time_ms(self, fn, warmup: int = 10, rep: int = 60) -> float:
        import torch

        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return 1.0


# the parts whose kernels the warm-up compiles (all of them compile on first use)
WARM_PARTS = ("attention", "attention_masks", "decode", "flex", "rope")


def warm(parts: list[str], until: float) -> int:
    """The warm-up process: run ``parts`` with a :class:`WarmCtx` until ``until`` (epoch s)."""
    import gpu_parts
    import torch

    if not torch.cuda.is_available():
        return 0
    start = time.time()
    for name in parts:
        ctx = WarmCtx(Path(os.devnull), name, until, True, False)
        try:
            gpu_parts.PARTS[name](ctx)
        except Exception as exc:
            print(f"warm-up {name}: {type(exc).__name__}: {exc}", flush=True)
        print(f"warm-up {name}: done at +{time.time() - start:.0f} s", flush=True)
        if time.time() > until:
            break
    return 0


def _start_warm(args, names: list[str], until: float, events: Path):
    """Start the warm-up process (its own process group; its output in a file)."""
    import subprocess

    parts = [n for n in WARM_PARTS if n in names]
    if not parts:
        return None
    log = events.parent / "warm.log"
    argv = [sys.executable, str(HERE / "gpu_suite.py"), "--warm", ",".join(parts),
            "--warm-until", repr(until), "--tune-configs", str(args.tune_configs)]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=HERE.parent)  # fmt: skip
    with open(events, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "group", "pgid": proc.pid}) + "\n")
    print(f"  (warm-up process {proc.pid} compiles {', '.join(parts)} meanwhile)", flush=True)
    return proc, log


def _stop_warm(warm_proc) -> None:
    import signal

    proc, log = warm_proc
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=5)
                break
            except ProcessLookupError:
                break
            except Exception:
                continue
    lines = Path(log).read_text(errors="replace").splitlines()
    done = [ln for ln in lines if ln.startswith("warm-up")]
    print("  warm-up process: " + ("; ".join(done[-8:]) or "nothing finished"), flush=True)


def load_bench(name: str):
    """A sibling benchmark script as a module (``attention`` -> ``benchmarks/attention.py``)."""
    key = f"bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


# test hook: "hang:PART" or "crash:PART" (comma-separated) makes that part hang or die, to
# check that the parent kills, reports and goes on (tests/test_gpu_suite.py)
FAULT_ENV = "LLAMAZH_GPU_SUITE_FAULT"


def _fault(part: str) -> None:
    faults = os.environ.get(FAULT_ENV, "").split(",")
    if f"hang:{part}" in faults:
        time.sleep(3600)
    if f"crash:{part}" in faults:
        os._exit(139)


def _device_ok() -> bool:
    import torch

    try:
        torch.cuda.synchronize()
        return float(torch.ones(4, device="cuda").sum().item()) == 4.0
    except Exception:
        return False


def run(args, steps, soft_deadline) -> int:
    """Run the parts named in ``args.child`` (comma-separated) in plan order."""
    names = args.child.split(",")
    events = args.events
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if cuda:  # each tuning's winner and time, in the log
        os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")
    import gpu_parts

    funcs = gpu_parts.PARTS
    with open(events, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "meta", "meta": gpu_parts.versions(cuda)}) + "\n")
    warm_proc = None
    for part, _ in steps:
        if part.name not in names:
            continue
        now = time.time()
        soft = soft_deadline(steps, part.name, args.start, now)
        testing = part.name.startswith("tests")
        if warm_proc is not None and not testing:
            _stop_warm(warm_proc)
            warm_proc = None
        if testing and warm_proc is None and cuda and not args.smoke and not args.no_warm:
            last_test = [p.name for p, _ in steps if p.name.startswith("tests")][-1]
            until = soft_deadline(steps, last_test, args.start, now)
            warm_proc = _start_warm(args, names, until, events)
        ctx = Ctx(events, part.name, soft, cuda, args.smoke)
        ctx.emit(event="start", part=part.name, soft_deadline=soft, t=now)
        print(
            f"\n===== {part.name}: {part.what} (until +{soft - args.start:.0f} s of the "
            f"budget, {soft - now:.0f} s from now) =====",
            flush=True,
        )
        _fault(part.name)
        try:
            if part.needs_cuda and not cuda and not args.smoke:
                raise Skip("needs a CUDA GPU, none on this machine (dry run)")
            funcs[part.name](ctx)
        except Skip as why:
            ctx.status = f"skipped: {why}"
        except Exception as exc:
            ctx.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            traceback.print_exc()
        restart = False
        if cuda:
            torch.cuda.empty_cache()
            if not _device_ok():
                ctx.status += "; the CUDA context broke: a fresh child runs the rest"
                restart = True
        if ctx.errors and ctx.status == "ok":
            ctx.status = f"ok, {ctx.errors} case(s) failed"
        ctx.emit(event="end", part=part.name, status=ctx.status, used_s=time.time() - now)
        print(f"===== {part.name}: {ctx.status} ({time.time() - now:.0f} s)", flush=True)
        if restart:
            return EXIT_RESTART
    if warm_proc is not None:
        _stop_warm(warm_proc)
    return 0
