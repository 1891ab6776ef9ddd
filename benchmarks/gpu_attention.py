"""The attention parts of ``gpu_suite.py``: dense, varlen + sliding window, decode and
FlexAttention, each ``part(ctx)`` reporting rows through ``ctx`` (``gpu_child.Ctx``).

FLOPs (``benchmarks/attention.py``, flash-attn's convention): forward ``4 * B * S^2 * H * D``,
halved when causal; forward + backward 3.5x forward. Masked cases (varlen, sliding window)
count only the visible (query, key) pairs: ``4 * H * D * pairs`` forward. Bytes: decode reads
K and V once (``2 * B * Sk * Hkv * D * 2``) plus q and out.
"""

from __future__ import annotations

import importlib.util

from gpu_child import Ctx, Skip, load_bench

BF16_ATTN = "bf16, batch * seqlen = 16k tokens, hidden 2048 (H = 2048 / D)"


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


def _record_tflops(ctx: Ctx, case: str, name: str, fn, args: tuple, mode: str, flop_fwd, **params):
    """Time ``fn(*args)`` in ``mode`` and add a TFLOP/s row (``flop_fwd``: forward FLOPs; a
    backward costs 2.5 forwards), or a failed row with the exception."""
    try:
        ms = _time_attention(ctx, fn, args, mode)
        fl = flop_fwd * (3.5 if mode == "fwd_bwd" else 1.0)
        ctx.add(
            case, name, "TFLOP/s", fl / ms / 1e9, "TFLOP/s", ms=round(ms, 4), mode=mode, **params
        )
    except Exception as exc:
        ctx.failed(case, name, "TFLOP/s", "TFLOP/s", exc, mode=mode, **params)


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
                _record_tflops(ctx, case, name, fn, args, mode, 4.0 * h * d * n_pairs, head_dim=d)


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
                _record_tflops(
                    ctx, case, name, fn, (q, k, v), mode, 4.0 * h * d * pairs, head_dim=d
                )
        del q, k, v
