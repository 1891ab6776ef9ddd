"""Every GPU test and benchmark of llamazh in one bounded command, for a bare lent GPU machine.

    PYTHONUNBUFFERED=1 timeout 540 python benchmarks/gpu_suite.py --out $OUT --budget-s 420

Parts, in order, each with its own time slice (``PARTS``; ``--budget-s`` scales them): the
device, versions and two measured ceilings (copy GB/s, 8192^3 bf16 matmul TFLOP/s); ``pytest -m
gpu``; the kernel tests on CUDA; attention throughput (dense, varlen + window, decode,
FlexAttention); the fused RoPE; a model-shaped training step. Output under ``--out``:
``results.csv`` (one row per measurement), ``table.md`` (plan, status, tables, targets) and
``log.txt`` (everything printed); all three are rewritten after every part, so a run killed
from outside still leaves what it measured. The short table is printed last.

Robustness: the parts run in a child process. A part past its slice is cut at the next case
boundary (the child checks); one still running ``GRACE`` seconds later is killed with its child
process, reported, and a fresh child runs the parts after it (so a hang or a sticky CUDA error
in one part costs only that part). An exception in a case or a part is reported and the rest
runs. Autotuning is bounded by ``LLAMAZH_TUNE_CONFIGS`` (``--tune-configs``, default 2).

Without CUDA the same command is a dry run: it prints the plan, reports every GPU part as
skipped with the reason, and writes the same three files. ``--smoke`` instead runs every
benchmark part at tiny sizes on the CPU (Triton's interpreter) to check the code paths.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import gpu_child  # noqa: E402
import gpu_report  # noqa: E402


@dataclass(frozen=True)
class Part:
    """One step of the suite: its share of the budget and its expected time on an H200."""

    name: str
    slice_s: float  # seconds at the default budget (420 s); scaled with --budget-s
    estimate_s: float  # expected on a bare H200 (empty Triton cache), see docs
    what: str
    needs_cuda: bool = True


PARTS = (
    Part(
        "env",
        15,
        8,
        "device, versions; ceilings: D2D copy GB/s, 8192^3 bf16 matmul TFLOP/s",
        needs_cuda=False,
    ),
    Part("tests_gpu", 60, 45, "pytest -m gpu tests (xdist when installed)"),
    Part("tests_kernels", 70, 50, "kernel/attention/rope-kernel tests on CUDA (fp16/fp32)"),
    Part("attention", 110, 85, "fwd, fwd+bwd TFLOP/s, D 64/128, causal/full, S 1k..16k"),
    Part("attention_masks", 30, 25, "varlen (16k packed) and sliding window (8k, w 2k)"),
    Part("decode", 15, 8, "Sq 1/8, KV 4k..64k, GQA 8:1: GB/s vs SDPA"),
    Part("flex", 35, 30, "FlexAttention (torch.compile) at S 8k, causal and window"),
    Part("rope", 25, 15, "fused RoPE fwd+bwd GB/s vs transformers eager and compiled"),
    Part("model", 45, 30, "train step SmolLM2-135M / 4 Llama-2-7B layers: llamazh vs sdpa"),
)
RESERVE_S = 15.0  # startup before the clock, writing outputs, the child's exit
GRACE_S = 15.0  # a part this long past its slice is killed
OVERRUN_S = 60.0  # late parts still get half a slice, up to this far past the plan's end
DEFAULT_BUDGET_S = 420.0


def plan(budget_s: float, only: list[str] | None) -> list[tuple[Part, float]]:
    """The selected parts with their slices, scaled so they sum to ``budget_s - RESERVE_S``."""
    chosen = [p for p in PARTS if not only or p.name in only]
    total = sum(p.slice_s for p in chosen)
    scale = max(budget_s - RESERVE_S, 1.0) / total
    return [(p, p.slice_s * scale) for p in chosen]


def soft_deadline(steps: list[tuple[Part, float]], name: str, start: float, now: float) -> float:
    """When part ``name`` must stop at a case boundary: where the plan ends it (time left over
    by earlier parts rolls forward), but never less than half its slice from ``now``, and
    never more than ``OVERRUN_S`` past the planned end of the whole run."""
    end = start
    for part, seconds in steps:
        end += seconds
        if part.name == name:
            last = start + sum(s for _, s in steps) + OVERRUN_S
            return min(max(end, now + 0.5 * seconds), last)
    raise KeyError(name)


def plan_table(steps: list[tuple[Part, float]]) -> str:
    lines = ["| part | slice s | H200 estimate s | what |", "|---|---|---|---|"]
    for part, seconds in steps:
        lines.append(f"| {part.name} | {seconds:.0f} | {part.estimate_s:.0f} | {part.what} |")
    total = sum(s for _, s in steps)
    est = sum(p.estimate_s for p, _ in steps)
    lines.append(f"| total | {total:.0f} (+{RESERVE_S:.0f} reserve) | {est:.0f} | |")
    return "\n".join(lines)


class Tee:
    """stdout that also goes to the log file."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a", encoding="utf-8")  # noqa: SIM115
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.stream.write(text)
            self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()


# ---- the parent: plan, children, outputs ----------------------------------------------------


def _kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(2.0)


def _pump(stream, out) -> None:
    """Copy the child's output to ours (and the log) until it closes, whatever happens."""
    for line in stream:
        try:
            out.write(line)
        except Exception:  # keep draining: a child blocked on a full pipe would hang
            continue
    out.flush()


def run_children(args, steps, start: float, report: gpu_report.Report) -> None:
    """Run the parts in child processes, restarting after a kill or a crash."""
    remaining = [p.name for p, _ in steps]
    events = Path(tempfile.mkdtemp(prefix="gpu_suite-")) / "events.jsonl"
    # nothing runs past this, whatever state the child is in
    last_call = start + sum(s for _, s in steps) + OVERRUN_S + args.grace_s
    while remaining:
        events.write_text("")
        argv = [
            sys.executable,
            str(Path(__file__)),
            "--child",
            ",".join(remaining),
            "--events",
            str(events),
            "--start",
            repr(start),
            "--budget-s",
            str(args.budget_s),
            "--tune-configs",
            str(args.tune_configs),
            *(["--only", *args.only] if args.only else []),
            *(["--smoke"] if args.smoke else []),
            *(["--no-warm"] if args.no_warm else []),
        ]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",  # a stray byte must not stop the pump (the child would block)
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        pump = threading.Thread(target=_pump, args=(proc.stdout, sys.stdout), daemon=True)
        pump.start()
        state = {"seen": 0, "current": None, "hard": None, "groups": []}

        def drain(state=state, remaining=remaining) -> None:
            lines = events.read_text().split("\n")[:-1]  # complete lines only
            for line in lines[state["seen"] :]:
                ev = json.loads(line)
                if ev["event"] == "start":
                    state["current"] = ev["part"]
                    state["hard"] = ev["soft_deadline"] + args.grace_s
                elif ev["event"] == "group":
                    state["groups"].append(ev["pgid"])
                elif ev["event"] == "end":
                    remaining.remove(ev["part"])
                    state["current"] = None
                report.handle(ev)
                if ev["event"] == "end":
                    report.write(args.out)
            state["seen"] = len(lines)

        while True:
            code = proc.poll()
            drain()
            if code is not None:
                break
            now, current = time.time(), state["current"]
            late = current is not None and now > state["hard"]
            if late or now > last_call:
                what = current or "the child, between parts,"
                print(f"\n!!! {what}: still running past its slice + grace: killed", flush=True)
                for pgid in [proc.pid, *state["groups"]]:
                    _kill_group(pgid)
                proc.wait()
                drain()  # what it wrote before it was killed
                break
            time.sleep(0.25)
        current = state["current"]
        pump.join(timeout=5)
        if current is not None:  # killed or crashed inside a part
            why = "killed: past its slice + grace" if code is None else f"crashed (exit {code})"
            used = time.time() - report.started.get(current, time.time())
            report.handle({"event": "end", "part": current, "status": why, "used_s": used})
            remaining.remove(current)
            report.write(args.out)
        elif code == gpu_child.EXIT_RESTART and remaining:
            print("\n=== a fresh child runs the parts left, after a device error ===", flush=True)
        elif remaining:  # died or hung between parts: report the rest, do not loop
            for name in remaining:
                report.handle(
                    {
                        "event": "end",
                        "part": name,
                        "used_s": 0.0,
                        "status": f"not run: the child ended ({code}) before it",
                    }
                )
            remaining = []
            report.write(args.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_suite")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PARTS])
    parser.add_argument(
        "--tune-configs",
        type=int,
        default=2,
        help="autotune over at most this many configs (0 = all)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU interpreter")
    parser.add_argument("--dry-run", action="store_true", help="plan only, even with CUDA")
    parser.add_argument("--grace-s", type=float, default=GRACE_S, help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-warm",
        action="store_true",
        help="no background warm-up (compiling the benchmarks' kernels while the tests run)",
    )
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    parser.add_argument("--warm-until", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= RESERVE_S:
        parser.error(f"--budget-s must be more than {RESERVE_S:.0f}, got {args.budget_s}")
    if args.tune_configs < 0:
        parser.error(f"--tune-configs must be >= 0, got {args.tune_configs}")
    os.environ["LLAMAZH_TUNE_CONFIGS"] = str(args.tune_configs)
    steps = plan(args.budget_s, args.only)
    if args.warm:
        return gpu_child.warm(args.warm.split(","), args.warm_until)
    if args.child:
        return gpu_child.run(args, steps, soft_deadline)

    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    log.write_text("")
    sys.stdout = Tee(sys.__stdout__, log)
    print(
        f"gpu_suite: budget {args.budget_s:.0f} s, out {args.out}, tune configs "
        f"{args.tune_configs or 'all'}{', smoke' if args.smoke else ''}\n"
    )
    print(plan_table(steps) + "\n", flush=True)
    report = gpu_report.Report(steps, budget_s=args.budget_s, plan_md=plan_table(steps))
    if args.dry_run:
        for part, _ in steps:
            report.handle(
                {"event": "end", "part": part.name, "used_s": 0.0, "status": "skipped: --dry-run"}
            )
    else:
        run_children(args, steps, start, report)
    report.total_s = time.time() - start
    report.write(args.out)
    print("\n" + report.short_table(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
