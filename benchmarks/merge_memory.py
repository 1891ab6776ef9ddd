"""Peak memory of merge_adapters against shard size (a multi-shard fp32 checkpoint).

Builds a random Llama (default: 8 layers, hidden 1024, vocabulary 55,296, about 0.9 GB in
fp32), saves it in shards of ``--shard-mb``, trains nothing but gives a seed-recipe adapter
(LoRA r=64 on the seven projections, embed_tokens and lm_head in full) random values, then
merges in a fresh subprocess and reads the kernel's resident high-water mark (``VmHWM``,
reset through ``/proc/self/clear_refs`` right before the merge, file-backed mmap pages
included) and reports it above the resident set just before the merge.

    PYTHONPATH=. python benchmarks/merge_memory.py --shard-mb 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def build(args: argparse.Namespace, root: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamazh.training import prepare_for_training, save_adapter

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(root / "base"), max_shard_size=f"{args.shard_mb}MB")
    prepared = prepare_for_training(model, rank=64, alpha=128)
    with torch.no_grad():
        for group in prepared.named_trainable().values():
            for _, p in group:
                p.add_(torch.randn_like(p) * 0.01)
    save_adapter(prepared, root / "adapter")


def measure(root: Path) -> dict:
    from llamazh.training import merge_adapters

    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    merge_adapters(root / "base", [root / "adapter"], root / "merged", progress=False)
    return {"rss_before": before, "peak": _status("VmHWM"), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=55296)
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "build":
        build(args, args.root)
        return
    if args.step == "measure":
        print(json.dumps(measure(args.root)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    forwarded = [
        f"--layers={args.layers}",
        f"--hidden={args.hidden}",
        f"--vocab={args.vocab}",
        f"--intermediate={args.intermediate}",
        f"--shard-mb={args.shard_mb}",
    ]
    with tempfile.TemporaryDirectory(prefix="merge-memory-") as tmp:
        root = Path(tmp)
        for step in ("build", "measure"):
            proc = subprocess.run(
                [sys.executable, __file__, f"--step={step}", f"--root={root}", *forwarded],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"{step} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        shards = sorted((root / "base").glob("*.safetensors"))
        sizes = [p.stat().st_size for p in shards]
        adapter = (root / "adapter" / "adapter_model.safetensors").stat().st_size
    mib = 2**20
    peak = result["peak"] - result["rss_before"]
    print(
        f"checkpoint: {sum(sizes) / mib:.0f} MiB in {len(sizes)} shards "
        f"(largest {max(sizes) / mib:.0f} MiB); "
        f"adapter {adapter / mib:.0f} MiB"
    )
    print(
        f"merge: peak RSS above the pre-merge RSS {peak / mib:.0f} MiB "
        f"= {peak / max(sizes):.2f}x the largest shard, {peak / sum(sizes):.2f}x the checkpoint; "
        f"{result['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
