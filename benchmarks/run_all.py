"""Run every benchmark in its small configuration and print one summary.

    python benchmarks/run_all.py                 # CPU benchmarks, a few minutes on 2 cores
    python benchmarks/run_all.py --only rope_long_context speculative
    python benchmarks/run_all.py --full          # each benchmark's default (long) settings

Each benchmark runs in its own process with its results directory under ``--out`` (default
``benchmarks/results/run_all``); its own output is shown as it runs. GPU benchmarks are listed
as skipped, with the reason, on a machine without CUDA. The summary gives each benchmark's
status, wall time and the last table it printed. See ``benchmarks/README.md`` for what the
columns of each table mean.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    name: str
    what: str
    quick: str = ""  # arguments of the small configuration
    needs_gpu: bool = False
    out_flag: str = "--out"


# the model shape both memory benchmarks use in their small configuration
SMALL_LLAMA = "--layers 2 --hidden 256 --intermediate 704 --vocab 16384"

BENCHES = (
    Bench(
        "tokenizer_efficiency",
        "tokens/char before and after the Chinese merge",
        "--vocab-size 8000",
        out_flag="--run-dir",
    ),
    Bench(
        "resize_init",
        "loss right after the resize, per init of the new rows",
        "--steps 60 --vocab-size 8000",
        out_flag="--run-dir",
    ),
    Bench(
        "training_memory",
        "peak RSS and step time: frozen / new_rows / full embeddings vs PEFT",
        f"{SMALL_LLAMA} --new 4096 --rank 16 --seq 128 --steps 2",
    ),
    Bench(
        "merge_memory",
        "peak RSS of merge_adapters against the largest shard",
        f"{SMALL_LLAMA} --shard-mb 8",
        out_flag="",
    ),
    Bench(
        "rope_long_context",
        "perplexity vs length per rotary scaling (no training at long lengths)",
        "--train-seconds 60 --lengths 256 512 1024 --windows 2",
    ),
    Bench(
        "speculative",
        "speed-up and acceptance of speculative decoding vs target-only",
        "--train-steps 60 --prompts 2 --max-new-tokens 48 --ks 2 4",
    ),
    Bench("attention", "FlashAttention-2 kernel vs SDPA (and flash-attn)", "--quick", True),
    Bench("rope_kernel", "fused RoPE kernel vs transformers' eager rotary", "", True),
)


TABULAR = re.compile(r"^\s*[|-]|\S {2,}\S")


def last_table(text: str) -> str:
    """The last block of consecutive table-looking lines of ``text`` (rows starting with ``|``
    or ``-``, or with cells separated by two or more spaces); else its last two lines."""
    lines = text.rstrip().splitlines()
    end = next((i for i in range(len(lines) - 1, -1, -1) if TABULAR.search(lines[i])), None)
    if end is None:  # no table: the last two lines of prose
        return "\n".join(line for line in lines[-2:] if line.strip())
    start = end
    while start > 0 and TABULAR.search(lines[start - 1]):
        start -= 1
    return "\n".join(lines[start : end + 1])


def run(bench: Bench, out: Path, full: bool, cuda: bool) -> tuple[str, float, str]:
    if bench.needs_gpu and not cuda:
        return "skipped: needs a CUDA GPU, none on this machine", 0.0, ""
    argv = [sys.executable, str(ROOT / f"{bench.name}.py"), *([] if full else bench.quick.split())]
    if bench.out_flag:
        argv += [bench.out_flag, str(out / bench.name)]
    print(f"\n##### {bench.name}: {' '.join(argv[1:])}", flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONUNBUFFERED": "1",  # stream the benchmark's output as it runs
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT.parent
    )
    captured = []
    for line in proc.stdout:  # type: ignore[union-attr]
        print(line, end="", flush=True)
        captured.append(line)
    status = "ok" if proc.wait() == 0 else f"FAILED (exit {proc.returncode})"
    return status, time.perf_counter() - start, last_table("".join(captured))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES])
    parser.add_argument("--full", action="store_true", help="each benchmark's default settings")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "run_all")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        results.append((bench, *run(bench, args.out, args.full, cuda)))

    print(
        f"\n==================== summary ({device}, torch {torch.__version__}) ===================="
    )
    width = max(len(b.name) for b, *_ in results)
    for bench, status, seconds, table in results:
        print(f"\n{bench.name.ljust(width)}  {status}  {seconds:6.0f} s  ({bench.what})")
        if table:
            print("    " + table.replace("\n", "\n    "))
    failed = [b.name for b, status, *_ in results if status.startswith("FAILED")]
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
