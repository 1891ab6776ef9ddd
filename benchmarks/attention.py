"""Attention throughput: llamazh's Triton FlashAttention-2 vs PyTorch SDPA (and flash-attn).

Setup as flash-attn's own benchmark: batch * seqlen = 16k tokens, hidden size 2048 (so
H = 2048 / D), bf16, q/k/v (B, S, H, D). FLOPs (the usual convention):

    forward       = 4 * B * S^2 * H * D      (halved when causal)
    backward      = 2.5 * forward
    fwd + bwd     = 3.5 * forward

Usage:
    python benchmarks/attention.py                   # S = 512 .. 16k, D = 64, 128
    python benchmarks/attention.py --quick           # S = 2k, 8k; D = 128; causal only
Writes table.txt, results.csv (one row per case with device, versions, git SHA) and
tflops.png under benchmarks/results/attention-<time>/ (or --out).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _timing import git_sha, median_ms  # noqa: E402


def flops(batch: int, seqlen: int, heads: int, head_dim: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * batch * seqlen * seqlen * heads * head_dim / (2.0 if causal else 1.0)
    return fwd if mode == "fwd" else 3.5 * fwd


def providers() -> dict:
    from llamazh.attention import flash_attn_func

    found = {
        "llamazh": lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal),
        "sdpa-flash": sdpa("FLASH_ATTENTION"),
    }
    if importlib.util.find_spec("flash_attn") is not None:
        import flash_attn

        found["flash-attn"] = lambda q, k, v, causal: flash_attn.flash_attn_func(
            q, k, v, causal=causal
        )
    return found


def sdpa(backend: str | None):
    """``fn(q, k, v, causal)`` on (B, S, H, D) tensors through PyTorch SDPA, pinned to one
    backend (a ``torch.nn.attention.SDPBackend`` member name such as ``"CUDNN_ATTENTION"``) or,
    with ``None``, left to PyTorch's choice. Raises ``AttributeError`` for a backend this torch
    does not have; a backend that cannot take the inputs raises when called."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = None if backend is None else getattr(SDPBackend, backend)

    def run(q, k, v, causal):
        # (B, S, H, D) -> (B, H, S, D) views; the backends take them as they are
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        gqa = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
        if member is None:
            out = torch.nn.functional.scaled_dot_product_attention(*args, is_causal=causal, **gqa)
        else:
            with sdpa_kernel(member):
                out = torch.nn.functional.scaled_dot_product_attention(
                    *args, is_causal=causal, **gqa
                )
        return out.transpose(1, 2)

    return run


def time_ms(fn, q, k, v, causal: bool, mode: str, warmup: int = 50, rep: int = 200,
            cuda: bool = True) -> float:  # fmt: skip
    """Median ms of ``fn`` forward (``mode="fwd"``, no autograd) or forward + backward."""
    if mode == "fwd":
        with torch.no_grad():
            return median_ms(lambda: fn(q, k, v, causal), warmup=warmup, rep=rep, cuda=cuda)
    out = fn(q, k, v, causal)
    dout = torch.randn_like(out)

    def step():
        o = fn(q, k, v, causal)
        torch.autograd.grad(o, (q, k, v), dout)

    return median_ms(step, warmup=warmup, rep=rep, cuda=cuda)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384]
    )
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--quick", action="store_true", help="S = 2k, 8k; D = 128; causal")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU (Triton kernels); none here. "
              "The kernels' correctness runs on CPU: pytest tests/kernels")  # fmt: skip
        return 0
    if args.quick:
        args.seqlens, args.head_dims, args.causal = [2048, 8192], [128], "yes"
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or ROOT / "benchmarks" / "results" / f"attention-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    device = torch.cuda.get_device_name()
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__, sha=git_sha())
    rows = []
    provs = providers()
    for d in args.head_dims:
        for causal in causals:
            for s in args.seqlens:
                b, h = max(1, args.tokens // s), args.hidden // d
                gen = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (
                    torch.randn(
                        b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen
                    ).requires_grad_()
                    for _ in range(3)
                )
                for mode in args.modes:
                    for name, fn in provs.items():
                        try:
                            ms = time_ms(fn, q, k, v, causal, mode)
                            tf = flops(b, s, h, d, causal, mode) / ms / 1e9
                        except Exception as exc:  # a provider may lack a shape; keep going
                            print(f"{name} D={d} S={s} {mode}: {type(exc).__name__}: {exc}")
                            ms = tf = float("nan")
                        rows.append(dict(meta, provider=name, mode=mode, causal=causal,
                                         head_dim=d, seqlen=s, batch=b, heads=h,
                                         ms=round(ms, 4), tflops=round(tf, 1)))  # fmt: skip
                        print(f"{name:>10} {mode:>7} causal={causal!s:5} D={d:3} S={s:5} "
                              f"{ms:8.3f} ms {tf:6.1f} TFLOP/s", flush=True)  # fmt: skip
                del q, k, v
    write_outputs(rows, out_dir, meta)
    return 0


def write_outputs(rows: list[dict], out_dir: Path, meta: dict) -> None:
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = sorted({r["provider"] for r in rows})
    seqlens = sorted({r["seqlen"] for r in rows})
    lines = [f"TFLOP/s on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, "
             f"llamazh {meta['sha']}); bf16, batch * seqlen = 16k, hidden 2048", ""]  # fmt: skip
    for key in sorted({(r["mode"], r["causal"], r["head_dim"]) for r in rows}):
        mode, causal, d = key
        lines.append(f"{mode}, causal={causal}, head_dim={d}")
        lines.append("| provider | " + " | ".join(f"{s // 1024}k" if s >= 1024 else str(s)
                                                   for s in seqlens) + " |")  # fmt: skip
        lines.append("|---" * (len(seqlens) + 1) + "|")
        for name in names:
            vals = {r["seqlen"]: r["tflops"] for r in rows if (r["mode"], r["causal"],
                    r["head_dim"], r["provider"]) == (mode, causal, d, name)}  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(f"{vals.get(s, float('nan')):.0f}"
                                                     for s in seqlens) + " |")  # fmt: skip
        lines.append("")
    text = "\n".join(lines)
    print(text)
    (out_dir / "table.txt").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install 'llamazh[plot]')")
        return
    keys = sorted({(r["mode"], r["causal"], r["head_dim"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, (mode, causal, d) in zip(axes[0], keys):
        for name in names:
            pts = [(r["seqlen"], r["tflops"]) for r in rows if (r["mode"], r["causal"],
                   r["head_dim"], r["provider"]) == (mode, causal, d, name)]  # fmt: skip
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode} causal={causal} D={d}", fontsize=9)
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "tflops.png", dpi=120)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    raise SystemExit(main())
