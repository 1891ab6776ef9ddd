"""The parts of ``gpu_suite.py`` and their registry ``PARTS``: env (versions, ceilings), the
two pytest runs and the fused RoPE here; attention in ``gpu_attention.py``, the model step in
``gpu_model_step.py``. Each ``part(ctx)`` reports rows through ``ctx`` (``gpu_child.Ctx``),
checks ``ctx.expired`` before every case and records a failing case without stopping.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import gpu_attention
import gpu_model_step
from gpu_attention import _k
from gpu_child import Ctx, Skip, load_bench

ROOT = Path(__file__).resolve().parent.parent


# ---- env: device, versions, ceilings ----------------------------------------------------------


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "absent"


def versions(cuda: bool) -> dict:
    """Device and versions: the first columns of every row, the first lines of the log."""
    import torch

    meta = dict(
        device="cpu",
        torch=torch.__version__,
        triton=_version("triton"),
        transformers=_version("transformers"),
        python=platform.python_version(),
        cuda_runtime=str(torch.version.cuda),
        peft=_version("peft"),
        flash_attn=_version("flash-attn"),
    )
    if cuda:
        props = torch.cuda.get_device_properties(0)
        meta.update(
            device=props.name,
            sms=props.multi_processor_count,
            gpu_mem_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cudnn=str(torch.backends.cudnn.version()),
        )
    from torch.nn.attention import SDPBackend

    meta["sdpa_backends"] = " ".join(m for m in SDPBackend.__members__ if m != "ERROR")
    meta["flex_attention"] = (
        importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    )
    return meta


def part_env(ctx: Ctx) -> None:
    import torch

    for key, value in versions(ctx.cuda).items():
        print(f"  {key:>15}: {value}")
    smi = _nvidia_smi()
    if smi:
        ctx.note(f"nvidia-smi: {smi}")
    if not ctx.cuda and not ctx.smoke:
        ctx.status = "versions only: the ceilings need a CUDA GPU, none here (dry run)"
        return
    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)
    n = 2**29 if ctx.cuda else 2**20  # fp32 elements: 2 GiB each way on the GPU
    src = torch.randn(n, device=dev, generator=gen)
    dst = torch.empty_like(src)

    def copy(dst=dst, src=src):
        return dst.copy_(src)

    ms = ctx.time_ms(copy, warmup=25, rep=100)
    copy_gbs = 2 * src.numel() * 4 / ms / 1e6  # bytes read + written
    size = f"{src.numel() * 4 / 2**20:.0f} MiB"
    ctx.add(f"device-to-device copy {size}", "torch", "GB/s", copy_gbs, "GB/s")
    del src, dst
    m = 8192 if ctx.cuda else 256
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    a = torch.randn(m, m, device=dev, dtype=dtype, generator=gen)  # random, never zeros
    b = torch.randn(m, m, device=dev, dtype=dtype, generator=gen)
    ms = ctx.time_ms(lambda: a @ b, warmup=25, rep=100)
    matmul = f"{m}^3 {str(dtype)[6:]} matmul"
    ctx.add(matmul, "torch", "TFLOP/s", 2 * m**3 / ms / 1e9, "TFLOP/s")
    ceilings = {"copy_gbs": round(copy_gbs, 1), "matmul_tflops": round(2 * m**3 / ms / 1e9, 1)}
    ctx.emit(event="meta", meta={**ceilings, "matmul_case": matmul})
    smi = _nvidia_smi()
    if smi:
        ctx.note(f"nvidia-smi after the ceilings: {smi}")


def _nvidia_smi() -> str:
    query = "name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,memory.used"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return f"{query}: {done.stdout.strip()}" if done.returncode == 0 else ""


# ---- tests ------------------------------------------------------------------------------------

SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")
# `-v` prints one line per finished test ("[gw3] [ 12%] PASSED tests/...::test_x[...]" under
# xdist), so a run killed at its slice can still be counted
OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def _pytest(ctx: Ctx, selection: list[str]) -> None:
    if ctx.smoke:
        raise Skip("smoke run: the test suite is run by pytest itself")
    workers = min(8, max(1, (os.cpu_count() or 2) // 2))
    xdist = ["-n", str(workers)] if importlib.util.find_spec("xdist") is not None else []
    if not xdist:
        ctx.note("pytest-xdist absent: tests run in one process (slower compiles)")
    # a module that fails to import must not stop the others from running
    flags = ["-v", "-p", "no:cacheprovider", "-rfE", "--continue-on-collection-errors"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        # one hung test (a kernel that never returns) ends its worker, not the whole slice
        flags += ["--timeout", "90", "--timeout-method", "thread"]
    argv = [sys.executable, "-m", "pytest", *flags, *xdist, *selection]
    env = {
        "LLAMAZH_HYPOTHESIS_PROFILE": "gpu",  # 4 examples a property: see tests/conftest.py
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    print("  $ " + " ".join(argv[1:]), flush=True)
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    ctx.emit(event="group", pgid=proc.pid)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
        sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(5.0, ctx.left()))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    counts, failures = _outcomes(lines)
    case = " ".join(selection)
    for kind in ("passed", "failed", "error", "skipped"):
        ctx.add(case, "pytest", kind, counts.get(kind, 0), "tests")
    for line in failures[:25]:
        ctx.note(line[:300])
    if timed_out:
        ctx.status = f"cut at its slice: pytest killed after {len(lines)} lines of output"
    elif proc.returncode not in (0, 5):  # 5: nothing collected
        ctx.status = (
            f"{counts.get('failed', 0)} failed, {counts.get('error', 0)} errors "
            f"(pytest exit {proc.returncode})"
        )


def _outcomes(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """Counts per outcome (pytest's summary line, else the per-test lines of a killed run)
    and the failing tests."""
    counts: dict[str, int] = {}
    summary = next((ln for ln in reversed(lines) if SUMMARY.search(ln) and " in " in ln), "")
    for number, kind in SUMMARY.findall(summary):
        counts[kind.rstrip("s") if kind.startswith("error") else kind] = int(number)
    per_test = [m.group(1) for ln in lines if "::" in ln for m in [OUTCOME.search(ln)] if m]
    if not summary:
        for outcome in per_test:
            key = {"ERROR": "error"}.get(outcome, outcome.lower())
            counts[key] = counts.get(key, 0) + 1
    failures = [ln.strip() for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    if not failures:  # killed before the short summary: take the per-test lines
        failures = [
            ln.strip() for ln in lines if "::" in ln and re.search(r"\b(FAILED|ERROR)\b", ln)
        ]
    return counts, failures


def part_tests_gpu(ctx: Ctx) -> None:
    _pytest(ctx, ["-m", "gpu", "tests"])


def part_tests_kernels(ctx: Ctx) -> None:
    # on CUDA the `device` fixture puts these on the GPU: fp16 (and fp32) against the reference
    _pytest(
        ctx,
        [
            "-m",
            "not gpu and not slow",
            "tests/kernels",
            "tests/attention",
            "tests/rope/test_kernel.py",
        ],
    )


# ---- RoPE ---------------------------------------------------------------------------------


def part_rope(ctx: Ctx) -> None:
    import torch

    rope = load_bench("rope_kernel")
    B, Hq, Hk, D = (4, 32, 8, 128) if not ctx.smoke else (1, 4, 2, 16)
    lengths = [8192, 2048] if not ctx.smoke else [32]
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    compiled = ctx.cuda
    if not compiled:
        ctx.note("smoke run: no torch.compile provider on a CPU")
    ctx.note(
        f"B={B}, Hq={Hq}, Hkv={Hk}, D={D}, {str(dtype)[6:]}; q/k (B, H, S, D) views as "
        "transformers has them; GB/s as rope_kernel.py counts it"
    )
    for S in lengths:
        if ctx.expired(f"S={_k(S)}"):
            return
        try:
            rows = rope.measure(
                B, S, Hq, Hk, D, dtype, compiled=compiled, device=ctx.device, timer=ctx.time_ms
            )
        except Exception as exc:
            if not compiled:
                ctx.failed(f"S={_k(S)}", "all", "GB/s", "GB/s", exc)
                continue
            ctx.note(f"with the compiled provider: {type(exc).__name__}: {exc}"[:300])
            rows = rope.measure(B, S, Hq, Hk, D, dtype, device=ctx.device, timer=ctx.time_ms)
        for _, name, fwd_ms, fwd_gbs, fb_ms, fb_gbs, x_fwd, x_fb in rows:
            for mode, ms, gbs, x in (
                ("fwd_bwd", fb_ms, fb_gbs, x_fb),
                ("fwd", fwd_ms, fwd_gbs, x_fwd),
            ):
                case = f"{mode} S={_k(S)}"
                ctx.add(case, name, "GB/s", gbs, "GB/s", ms=round(ms, 4), mode=mode, seqlen=S)
                ctx.add(case, name, "x eager", x, "x", mode=mode, seqlen=S)
        torch.cuda.empty_cache() if ctx.cuda else None


PARTS = {
    "env": part_env,
    "tests_gpu": part_tests_gpu,
    "tests_kernels": part_tests_kernels,
    "attention": gpu_attention.part_attention,
    "attention_masks": gpu_attention.part_attention_masks,
    "decode": gpu_attention.part_decode,
    "flex": gpu_attention.part_flex,
    "rope": part_rope,
    "model": gpu_model_step.part_model,
}
