"""Fused RoPE kernel vs transformers' eager ``apply_rotary_pos_emb`` on a GPU.

For each sequence length: forward and forward+backward time (median of Triton's
``do_bench``), the achieved memory bandwidth and the speed-up. Both providers get the same
inputs: q (B, Hq, S, D) and k (B, Hkv, S, D) as transformers builds them (transposed views of
the projections), bf16.

Bytes moved (the roofline; anything else is overhead):
  forward:          read q, k + write q', k'          = 2 * B * S * (Hq + Hkv) * D * itemsize
                    + the tables: ours reads cos, sin (S, D/2) fp32 = 2 * S * D/2 * 4
  forward+backward: twice the q/k traffic (gradients are rotated back the same way).

    PYTHONPATH=$PWD python benchmarks/rope_kernel.py [--batch 4 --heads 32 --kv-heads 8]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_ms


def bench(fn) -> float:
    """Median milliseconds of ``fn()``."""
    return median_ms(fn, warmup=25, rep=100)


EAGER = "transformers eager"


def providers(B: int, S: int, Hq: int, Hk: int, D: int, dtype: torch.dtype, *,
              compiled: bool = False, device: str = "cuda"):  # fmt: skip
    """q (B, Hq, S, D), k (B, Hk, S, D) views and ``{name: fn(q, k) -> (q', k')}``: the fused
    kernel, transformers' eager rotary and, with ``compiled``, the latter under torch.compile."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from llamazh.rope import NoScaling, apply_rotary, rope_cos_sin

    gen = torch.Generator(device=device).manual_seed(0)
    q_proj = torch.randn(B, S, Hq * D, device=device, dtype=dtype, generator=gen)
    k_proj = torch.randn(B, S, Hk * D, device=device, dtype=dtype, generator=gen)
    q = q_proj.view(B, S, Hq, D).transpose(1, 2)  # (B, Hq, S, D) view, as transformers has it
    k = k_proj.view(B, S, Hk, D).transpose(1, 2)
    inv_freq, _ = NoScaling().inv_freq(D, 10000.0, device=device)
    positions = torch.arange(S, device=device)
    cos_half, sin_half = rope_cos_sin(inv_freq, positions, full_width=False)  # (S, D/2) fp32
    cos_hf, sin_hf = rope_cos_sin(inv_freq, positions[None], dtype=dtype)  # (1, S, D) bf16

    def ours(a, b):
        return apply_rotary(a, b, cos_half, sin_half, layout="bhsd", backend="triton")

    def eager(a, b):
        return apply_rotary_pos_emb(a, b, cos_hf, sin_hf)

    fns = {"llamazh (Triton)": ours, EAGER: eager}
    if compiled:
        fns["transformers compiled"] = torch.compile(eager, dynamic=False)
    return q, k, fns


def measure(B: int, S: int, Hq: int, Hk: int, D: int, dtype: torch.dtype, *,
            compiled: bool = False, device: str = "cuda", timer=bench) -> list[list]:  # fmt: skip
    """Rows [S, provider, fwd ms, fwd GB/s, f+b ms, f+b GB/s, speed-up fwd, speed-up f+b];
    speed-ups are over transformers' eager rotary (so its own are 1.0)."""
    item = torch.finfo(dtype).bits // 8
    qk_bytes = 2 * B * S * (Hq + Hk) * D * item
    q, k, fns = providers(B, S, Hq, Hk, D, dtype, compiled=compiled, device=device)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    rows = []
    for name, fn in fns.items():
        fwd_ms = timer(lambda fn=fn: fn(q, k))
        ql, kl = q.detach().requires_grad_(True), k.detach().requires_grad_(True)

        def step(fn=fn, ql=ql, kl=kl):
            return torch.autograd.grad(fn(ql, kl), (ql, kl), (gq, gk))

        fb_ms = timer(step)
        table_bytes = 2 * S * (D // 2) * 4 if name.startswith("llamazh") else 2 * S * D * item
        fwd_gbs = (qk_bytes + table_bytes) / fwd_ms / 1e6
        fb_gbs = (2 * qk_bytes + 2 * table_bytes) / fb_ms / 1e6
        rows.append([S, name, fwd_ms, fwd_gbs, fb_ms, fb_gbs])
    eager = next(r for r in rows if r[1] == EAGER)
    for row in rows:
        row += [eager[2] / row[2], eager[4] / row[4]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--peak-gbs", type=float, default=3350.0, help="HBM peak (H100 SXM)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rope_kernel"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("rope_kernel: no CUDA GPU on this machine; this benchmark needs one (skipped).")
        return
    B, Hq, Hk, D, dtype = args.batch, args.heads, args.kv_heads, args.head_dim, torch.bfloat16
    rows = []
    for S in args.lengths:
        rows += measure(B, S, Hq, Hk, D, dtype)
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name()
    import transformers
    import triton

    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    print(f"{device}; {versions}, transformers {transformers.__version__}; B={B} Hq={Hq} "
          f"Hkv={Hk} D={D} bf16")  # fmt: skip
    header = (
        f"{'S':>6} {'provider':20} {'fwd ms':>8} {'fwd GB/s':>9} {'%peak':>6} "
        f"{'f+b ms':>8} {'f+b GB/s':>9} {'%peak':>6} {'x fwd':>6} {'x f+b':>6}"
    )
    print(header + "\n" + "-" * len(header))
    for S, name, fwd_ms, fwd_gbs, fb_ms, fb_gbs, x_fwd, x_fb in rows:
        print(
            f"{S:6d} {name:20} {fwd_ms:8.4f} {fwd_gbs:9.0f} {100 * fwd_gbs / args.peak_gbs:5.0f}% "
            f"{fb_ms:8.4f} {fb_gbs:9.0f} {100 * fb_gbs / args.peak_gbs:5.0f}% "
            f"{x_fwd:6.2f} {x_fb:6.2f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["S", "provider", "fwd_ms", "fwd_GBps", "fb_ms", "fb_GBps", "speedup_fwd",
                         "speedup_fb", "device", "torch", "triton", "git_sha"])  # fmt: skip
        for row in rows:
            writer.writerow([*row, device, torch.__version__, triton.__version__,
                             sha.stdout.strip() or "unknown"])  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for provider in {r[1] for r in rows}:
        mine = [r for r in rows if r[1] == provider]
        ax.plot([r[0] for r in mine], [r[3] for r in mine], marker="o", label=f"{provider} fwd")
        ax.plot([r[0] for r in mine], [r[5] for r in mine], marker="s", ls="--",
                label=f"{provider} fwd+bwd")  # fmt: skip
    ax.axhline(args.peak_gbs, color="grey", ls=":", label="HBM peak")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("GB/s")
    ax.set_title(f"RoPE on {device}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "rope_kernel.png", dpi=120)


if __name__ == "__main__":
    main()
