"""Memory and time of one training step: embeddings frozen / new_rows / full vs PEFT.

Each provider runs in a fresh subprocess (so nothing is shared or cached between them):
build a Llama of the given shape in fp32 on the CPU, prepare it, run one warm-up step
(AdamW creates its state lazily), then measure ``--steps`` further steps.

Memory method (CPU, no allocator statistics for CPU tensors in torch): the kernel's resident
high-water mark. Before the measured steps the script writes ``5`` to ``/proc/self/clear_refs``,
which resets ``VmHWM``; after them ``VmHWM`` is the peak resident set over exactly those steps,
weights, gradients, optimizer state and activations included. glibc is told to serve every
allocation above 128 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the
resident set at once instead of lingering in malloc's free lists.

Time: process CPU time of one step (minimum over the measured steps) with one thread, since
wall time on a shared 2-core machine measures the neighbours more than the step.

Bytes, analytically (fp32): trainable params P -> gradients 4P + AdamW moments 8P; LoRA on
the seven projections adds r * (in + out) per projection. Full embeddings and lm_head: P = 2VH;
new rows: P = 2nH; PEFT ``modules_to_save`` additionally keeps a trainable copy beside each
frozen original (+2VH weights).

    PYTHONPATH=. python benchmarks/training_memory.py            # 8 layers, hidden 1024, V=55,296
    PYTHONPATH=. python benchmarks/training_memory.py --layers 2 --hidden 256 --vocab 8192 \\
        --new 3000 --intermediate 704 --rank 8
    # a slice of a 7B: two Llama-2-7B decoder layers with Chinese-LLaMA-2's 55,296-row vocabulary
    PYTHONPATH=. python benchmarks/training_memory.py --layers 2 --hidden 4096 \\
        --intermediate 11008 --seq 1024 --steps 1
    # SmolLM2-135M's shape (tied), 4,096 new rows
    PYTHONPATH=. python benchmarks/training_memory.py --layers 30 --hidden 576 --kv-heads 3 \\
        --intermediate 1536 --vocab 53248 --new 4096 --tied --seq 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

PROVIDERS = (
    "ours:frozen",
    "ours:new_rows",
    "ours:full",
    "peft:modules_to_save",
    "peft:trainable_tokens",
)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.kv_heads or args.hidden // 64,
        max_position_embeddings=4096,
        tie_word_embeddings=args.tied,
        use_cache=False,
    )
    model = LlamaForCausalLM(config).train()
    new_ids = list(range(args.vocab - args.new, args.vocab))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    kind, _, mode = args.worker.partition(":")
    if kind == "ours":
        from llamazh.training import prepare_for_training

        prepared = prepare_for_training(
            model,
            rank=args.rank,
            alpha=2 * args.rank,
            dropout=0.0,
            target_modules=targets,
            embeddings=mode,
            lm_head=mode,
            new_token_ids=new_ids,
        )
        params = [p for g in prepared.param_groups(2e-4) for p in g["params"]]
    else:
        import warnings

        from peft import LoraConfig, get_peft_model

        extra = (
            {"modules_to_save": ["embed_tokens", "lm_head"]}
            if mode == "modules_to_save"
            else {"trainable_token_indices": {"embed_tokens": new_ids, "lm_head": new_ids}}
            if not args.tied
            else {"trainable_token_indices": {"embed_tokens": new_ids}}  # PEFT ties the lm_head
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(
                model,
                LoraConfig(
                    r=args.rank,
                    lora_alpha=2 * args.rank,
                    lora_dropout=0.0,
                    target_modules=targets,
                    **extra,
                ),
            )
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)

    def step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

    step()  # warm-up: creates the AdamW state
    rss_before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = [step() for _ in range(args.steps)]
    peak = _status("VmHWM")
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    return {
        "provider": args.worker,
        "trainable": sum(p.numel() for p in params),
        "optimizer_state_bytes": state,
        "rss_before_step": rss_before,
        "peak_rss": peak,
        "step_s": sorted(t[0] for t in times)[len(times) // 2],
        "step_cpu_s": min(t[1] for t in times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=55296)
    parser.add_argument("--new", type=int, default=23296)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=0, help="default: hidden // 64")
    parser.add_argument("--tied", action="store_true", help="tie lm_head to the embedding")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    out = (
        args.out
        or Path("benchmarks/results")
        / f"training_memory-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    )
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(args.threads)}
    forwarded = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in (
            "layers",
            "hidden",
            "intermediate",
            "vocab",
            "new",
            "rank",
            "batch",
            "seq",
            "steps",
            "threads",
            "kv_heads",
        )
    ] + (["--tied"] if args.tied else [])
    rows = []
    for provider in args.providers.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, f"--worker={provider}", *forwarded],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(f"{provider} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done: {provider}", file=sys.stderr)

    base = next((r for r in rows if r["provider"] == "peft:modules_to_save"), rows[0])
    full = next((r for r in rows if r["provider"] == "ours:full"), base)
    mib = 2**20
    header = (
        f"{'provider':<24}{'trainable':>13}{'optim state MiB':>17}{'peak RSS MiB':>14}"
        f"{'vs PEFT mts':>13}{'vs ours full':>14}{'step CPU s':>12}{'vs PEFT':>9}"
    )
    lines = [
        f"config: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"vocab {args.vocab:,} ({args.new:,} new){', tied' if args.tied else ''}, "
        f"LoRA r={args.rank}, "
        f"batch {args.batch}x{args.seq}, fp32, CPU",
        header,
    ]
    for r in rows:
        lines.append(
            f"{r['provider']:<24}{r['trainable']:>13,}{r['optimizer_state_bytes'] / mib:>17.1f}"
            f"{r['peak_rss'] / mib:>14.0f}{r['peak_rss'] / base['peak_rss'] - 1:>+13.1%}"
            f"{r['peak_rss'] / full['peak_rss'] - 1:>+14.1%}{r['step_cpu_s']:>12.2f}"
            f"{r['step_cpu_s'] / base['step_cpu_s']:>8.2f}x"
        )
    import torch

    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines.append(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, git {sha or '?'}; step time = min process CPU time over the "
        "measured steps, 1 thread (wall time on a shared machine is noise)"
    )
    table = "\n".join(lines)
    print(table)
    (out / "table.txt").write_text(table + "\n")
    (out / "rows.json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str)
    )


if __name__ == "__main__":
    main()
