"""The parts of ``gpu_suite.py`` (all but the model step): each ``part(ctx)`` measures and
reports rows through ``ctx`` (see ``gpu_child.Ctx``), checks ``ctx.expired`` before every case
and records a failing case without stopping.

FLOPs (``benchmarks/attention.py``, flash-attn's convention): forward ``4 * B * S^2 * H * D``,
halved when causal; forward + backward 3.5x forward. Masked cases (varlen, sliding window)
count only the visible (query, key) pairs: ``4 * H * D * pairs`` forward. Bytes: decode reads
K and V once (``2 * B * Sk * Hkv * D * 2``) plus q and out; RoPE as ``rope_kernel.py``.
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

from gpu_child import Ctx, Skip, load_bench

ROOT = Path(__file__).resolve().parent.parent
BF16_ATTN = "bf16, batch * seqlen = 16k tokens, hidden 2048 (H = 2048 / D)"


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


# ---- attention ----------------------------------------------------------------------------


def _providers(ctx: Ctx) -> dict:
    bench = load_bench("attention")
    found = {"llamazh": bench.providers()["llamazh"]}
    for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
        try:
            found[name] = bench.sdpa(backend)
        except AttributeError:
            ctx.note(f"{name}: this torch has no SDPBackend.{backend}")
    if importlib.util.find_spec("flash_attn") is not None:
        found["flash-attn"] = bench.providers()["flash-attn"]
    return found


def _qkv(ctx: Ctx, b: int, sq: int, sk: int, h: int, hkv: int, d: int):
    import torch

    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    shapes = ((b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d))
    return [
        torch.randn(s, device=ctx.device, dtype=dtype, generator=gen).requires_grad_()
        for s in shapes
    ]


def _time_attention(ctx: Ctx, fn, args: tuple, mode: str) -> float:
    import torch

    if mode == "fwd":
        with torch.no_grad():
            return ctx.time_ms(lambda: fn(*args))
    leaves = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(*args)
    dout = torch.randn_like(out)
    return ctx.time_ms(lambda: torch.autograd.grad(fn(*args), leaves, dout))


def part_attention(ctx: Ctx) -> None:
    bench = load_bench("attention")
    provs = _providers(ctx)
    tokens, hidden = (16384, 2048) if not ctx.smoke else (128, 64)
    long_first = [16384, 8192, 4096, 2048, 1024] if not ctx.smoke else [64, 32]
    dims = [128, 64] if not ctx.smoke else [32, 16]
    # the cases the targets read first, the short sequences last
    cases = [(s, d, c) for s in long_first for d in dims for c in (True, False)]
    ctx.note(BF16_ATTN + "; TFLOP/s, median of do_bench (L2 flushed)")
    for s, d, causal in cases:
        b, h = max(1, tokens // s), hidden // d
        q, k, v = _qkv(ctx, b, s, s, h, h, d)
        for mode in ("fwd_bwd", "fwd"):
            case = f"{mode} {'causal' if causal else 'full'} D={d} S={_k(s)}"
            for name, fn in provs.items():
                if ctx.expired(f"{case} {name}"):
                    return
                params = dict(mode=mode, causal=causal, head_dim=d, seqlen=s, batch=b, heads=h)
                try:
                    ms = _time_attention(ctx, fn, (q, k, v, causal), mode)
                    tf = bench.flops(b, s, h, d, causal, mode) / ms / 1e9
                    ctx.add(case, name, "TFLOP/s", tf, "TFLOP/s", ms=round(ms, 4), **params)
                except Exception as exc:
                    ctx.failed(case, name, "TFLOP/s", "TFLOP/s", exc, **params)
        del q, k, v


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _window_pairs(s: int, left: int) -> int:
    # causal with `left` keys before the diagonal: row i sees min(i, left) + 1 keys
    return sum(min(i, left) + 1 for i in range(s))


def part_attention_masks(ctx: Ctx) -> None:
    import torch

    from llamazh.attention import flash_attn_func, flash_attn_varlen_func

    bench = load_bench("attention")
    d, h = (128, 16) if not ctx.smoke else (16, 2)
    unit = 1 if not ctx.smoke else 64
    lens = [x // unit for x in (4096, 2048, 3072, 1024, 512, 2560, 1536, 1536)]  # 16k total
    total, longest = sum(lens), max(lens)
    cu = torch.tensor(
        [0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=ctx.device
    )
    pairs = sum(n * (n + 1) // 2 for n in lens)  # causal pairs inside each sequence
    q, k, v = (t[0] for t in _qkv(ctx, 1, total, total, h, h, d))  # (total, H, D) packed
    qp, kp, vp = _qkv(ctx, len(lens), longest, longest, h, h, d)  # padded (B, longest, H, D)
    sdpa_flash = bench.sdpa("FLASH_ATTENTION")
    s, left = (8192, 2047) if not ctx.smoke else (128, 31)
    qw, kw, vw = _qkv(ctx, 2, s, s, h, h, d)
    i = torch.arange(s, device=ctx.device)
    band = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - left)  # (S, S) visible
    w_pairs = 2 * _window_pairs(s, left)  # batch 2

    def sdpa_band(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(
            [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
        ):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=band
            ).transpose(1, 2)

    cases = {
        f"varlen 8 seqs {_k(total)} tokens D={d} causal": [
            (
                "llamazh varlen",
                lambda q, k, v: flash_attn_varlen_func(
                    q, k, v, cu, cu, longest, longest, causal=True
                ),
                (q, k, v),
                pairs,
            ),
            ("sdpa-flash padded", lambda q, k, v: sdpa_flash(q, k, v, True), (qp, kp, vp), pairs),
        ],
        f"window {left + 1} S={_k(s)} B=2 D={d} causal": [
            (
                "llamazh window",
                lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=(left, 0)),
                (qw, kw, vw),
                w_pairs,
            ),
            ("sdpa bool mask", sdpa_band, (qw, kw, vw), w_pairs),
        ],
    }
    for label, provs in cases.items():
        for mode in ("fwd_bwd", "fwd"):
            case = f"{mode} {label}"
            for name, fn, args, n_pairs in provs:
                if ctx.expired(f"{case} {name}"):
                    return
                try:
                    ms = _time_attention(ctx, fn, args, mode)
                    fl = 4.0 * h * d * n_pairs * (3.5 if mode == "fwd_bwd" else 1.0)
                    ctx.add(
                        case,
                        name,
                        "TFLOP/s",
                        fl / ms / 1e9,
                        "TFLOP/s",
                        ms=round(ms, 4),
                        mode=mode,
                        head_dim=d,
                    )
                except Exception as exc:
                    ctx.failed(case, name, "TFLOP/s", "TFLOP/s", exc, mode=mode, head_dim=d)


def part_decode(ctx: Ctx) -> None:
    import torch

    from llamazh.attention import flash_attn_func

    b, h, hkv, d = (4, 32, 4, 128) if not ctx.smoke else (1, 8, 1, 16)
    kv_lens = [65536, 16384, 4096, 32768, 8192] if not ctx.smoke else [256, 128]
    provs = {
        "llamazh": lambda q, k, v: flash_attn_func(q, k, v, causal=True),
        "sdpa": _sdpa_decode(None),
        "sdpa-flash": _sdpa_decode("FLASH_ATTENTION"),
    }
    ctx.note(
        f"B={b}, H={h}, Hkv={hkv} (GQA 8:1), D={d}, causal bottom-right; GB/s counts K, V "
        "read once plus q and out"
    )
    for sk in kv_lens:
        kv = _qkv(ctx, b, 16, sk, h, hkv, d)
        k, v = (t.detach() for t in kv[1:])
        for sq in (1, 8):
            q = kv[0][:, :sq].detach().contiguous()
            item = k.element_size()
            nbytes = 2 * k.numel() * item + 2 * q.numel() * item
            case = f"decode Sq={sq} KV={_k(sk)}"
            for name, fn in provs.items():
                if ctx.expired(f"{case} {name}"):
                    return
                try:
                    with torch.no_grad():
                        ms = ctx.time_ms(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v))
                    ctx.add(
                        case,
                        name,
                        "GB/s",
                        nbytes / ms / 1e6,
                        "GB/s",
                        ms=round(ms, 4),
                        kv_len=sk,
                        q_len=sq,
                    )
                except Exception as exc:
                    ctx.failed(case, name, "GB/s", "GB/s", exc, kv_len=sk, q_len=sq)
        del kv, k, v


def _sdpa_decode(backend: str | None):
    """SDPA on decode shapes, GQA native (``enable_gqa``), no mask: with Sq = 1 that is the
    causal result; with Sq = 8 it differs from it only by the last 7 keys (same bytes)."""
    import torch

    def run(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, S, D) views
        if backend is None:
            out = torch.nn.functional.scaled_dot_product_attention(*args, enable_gqa=True)
        else:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                out = torch.nn.functional.scaled_dot_product_attention(*args, enable_gqa=True)
        return out.transpose(1, 2)

    return run


def part_flex(ctx: Ctx) -> None:
    import torch

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Skip(f"torch {torch.__version__} has no FlexAttention ({exc})") from exc
    if not ctx.cuda:
        raise Skip("smoke run: FlexAttention compiles through inductor, too slow on a CPU")
    from llamazh.attention import flash_attn_func

    flex = torch.compile(flex_attention, dynamic=False)
    s, b, left = 8192, 2, 2047

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= left)

    # one compile per (mask, head dim, grad mode): ~5-15 s each, the most important first
    cases = [
        (128, "causal", causal, (-1, 0)),
        (128, f"window {left + 1}", window, (left, 0)),
        (64, "causal", causal, (-1, 0)),
    ]
    ctx.note(f"S={_k(s)}, B={b}, H=2048/D, bf16; each FlexAttention case compiles first")
    for d, label, mod, win in cases:
        h = 2048 // d
        q, k, v = _qkv(ctx, b, s, s, h, h, d)
        pairs = b * (_window_pairs(s, left) if "window" in label else s * (s + 1) // 2)
        if ctx.expired(f"{label} D={d}"):
            return
        try:
            mask = create_block_mask(mod, None, None, s, s, device=ctx.device)
        except Exception as exc:
            ctx.failed(f"{label} D={d}", "flex", "TFLOP/s", "TFLOP/s", exc)
            continue

        def run_flex(q, k, v, mask=mask):
            return flex(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask
            ).transpose(1, 2)

        def run_ours(q, k, v, win=win):
            return flash_attn_func(q, k, v, causal=True, window_size=win)

        for mode in ("fwd_bwd", "fwd"):
            case = f"{mode} {label} D={d} S={_k(s)}"
            for name, fn in (("flex", run_flex), ("llamazh", run_ours)):
                if ctx.expired(f"{case} {name}"):
                    return
                try:
                    ms = _time_attention(ctx, fn, (q, k, v), mode)
                    fl = 4.0 * h * d * pairs * (3.5 if mode == "fwd_bwd" else 1.0)
                    ctx.add(
                        case,
                        name,
                        "TFLOP/s",
                        fl / ms / 1e9,
                        "TFLOP/s",
                        ms=round(ms, 4),
                        mode=mode,
                        head_dim=d,
                    )
                except Exception as exc:
                    ctx.failed(case, name, "TFLOP/s", "TFLOP/s", exc, mode=mode, head_dim=d)
        del q, k, v


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
    "attention": part_attention,
    "attention_masks": part_attention_masks,
    "decode": part_decode,
    "flex": part_flex,
    "rope": part_rope,
}
