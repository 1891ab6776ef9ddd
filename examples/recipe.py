"""The Chinese-LLaMA recipe in miniature, end to end on a CPU.

    python examples/recipe.py            # a few minutes on 2 cores
    python examples/recipe.py --quick    # well under a minute (what CI runs)

Steps (each prints its numbers and caches its outputs in the run directory, so a second run
resumes where the first stopped):

1. pre-train a tiny "original LLaMA" on English with the Llama-2 tokenizer;
2. train a Chinese SentencePiece vocabulary and merge it into Llama-2's;
3. resize the embeddings (sub-word mean init) and continue pre-training on Chinese with LoRA
   plus new-row embeddings and a fully trained lm_head;
4. instruction-tune with the ``alpaca2`` template, generation before and after;
5. long context: perplexity at 1x-8x the training length under several rotary scalings;
6. merge both adapters (Alpaca-Plus style) into a standalone model directory, load it with
   stock ``from_pretrained`` and the exported tokenizer, generate;
7. decode the merged model with the speculative sampler and a small draft.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from recipe_adapt import (
    Context,
    step_continue_pretraining,
    step_instruction_tuning,
    step_pretrain,
    step_vocabulary,
)
from recipe_deploy import plot_losses, step_long_context, step_merge, step_speculative
from recipe_lib import Run, read_lines, table

import llamazh

DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Sizes:
    """Everything that makes the quick run quick."""

    en_chars: int
    zh_chars: int
    classical_chars: int
    hidden: int
    layers: int
    heads: int
    block: int
    batch: int
    pretrain_steps: int
    zh_vocab: int
    cpt_steps: int
    sft_records: int
    sft_steps: int
    draft_hidden: int
    draft_steps: int
    lora_rank: int
    spec_new_tokens: int


FULL = Sizes(
    en_chars=400_000,
    zh_chars=300_000,
    classical_chars=60_000,
    hidden=128,
    layers=4,
    heads=4,
    block=128,
    batch=8,
    pretrain_steps=150,
    zh_vocab=6000,
    cpt_steps=150,
    sft_records=600,
    sft_steps=150,
    draft_hidden=64,
    draft_steps=100,
    lora_rank=16,
    spec_new_tokens=64,
)
QUICK = Sizes(
    en_chars=40_000,
    zh_chars=40_000,
    classical_chars=10_000,
    hidden=64,
    layers=2,
    heads=2,
    block=64,
    batch=4,
    pretrain_steps=25,
    zh_vocab=3000,
    cpt_steps=20,
    sft_records=60,
    sft_steps=10,
    draft_hidden=32,
    draft_steps=20,
    lora_rank=8,
    spec_new_tokens=24,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/recipe", help="where steps cache outputs")
    parser.add_argument("--quick", action="store_true", help="a much smaller run (< 1 minute)")
    parser.add_argument("--fresh", action="store_true", help="delete the run directory first")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    root = Path(args.run_dir)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    run = Run(root)
    start = time.perf_counter()
    (root / "sizes.json").write_text(json.dumps(asdict(sizes), indent=1))
    print(
        f"llamazh {llamazh.__version__}: run directory {root} ({'quick' if args.quick else 'full'})"
    )

    en = read_lines(DATA / "corpus" / "en_d2l.txt", sizes.en_chars)
    zh_all = read_lines(DATA / "corpus" / "zh_d2l.txt", sizes.zh_chars, min_cjk=0.3)
    cut = len(zh_all) * 9 // 10
    zh_train, zh_heldout = zh_all[:cut], zh_all[cut:]
    classical = read_lines(DATA / "corpus" / "zh_classical.txt", sizes.classical_chars)
    en_cut = len(en) * 9 // 10
    en_train, en_heldout = en[:en_cut], en[en_cut:]
    c = Context(sizes, run, en_train, en_heldout, zh_train, zh_heldout, classical)
    for step in (
        step_pretrain,
        step_vocabulary,
        step_continue_pretraining,
        step_instruction_tuning,
        step_long_context,
        step_merge,
        step_speculative,
    ):
        step(c)
    plot_losses(run)
    wall = time.perf_counter() - start
    print_summary(run, wall)
    return 0


def print_summary(run: Run, wall: float) -> None:
    s = run.summary
    rows = [
        {
            "step": "1 pre-train (en)",
            "result": f"en ppl {s['01_base']['en_ppl']:.1f}",
            "s": s["01_base"]["seconds"],
        },
        {
            "step": "2 vocabulary",
            "result": (
                f"zh tokens/char {s['02_vocab']['zh_tpc_llama2']:.3f} -> "
                f"{s['02_vocab']['zh_tpc_merged']:.3f} ({s['02_vocab']['merged_size']} pieces)"
            ),
            "s": s["02_vocab"]["seconds"],
        },
        {
            "step": "3 continued pre-training",
            "result": (
                f"zh ppl {s['03_cpt']['zh_ppl_before']:.1f} -> {s['03_cpt']['zh_ppl_after']:.1f}, "
                f"en ppl {s['03_cpt']['en_ppl_before']:.1f} -> {s['03_cpt']['en_ppl_after']:.1f}"
            ),
            "s": s["03_cpt"]["seconds"],
        },
        {
            "step": "4 instruction tuning",
            "result": (
                f"book accuracy {s['04_sft']['accuracy_before']:.0%} -> "
                f"{s['04_sft']['accuracy_after']:.0%} (2 books: chance 50%), answer loss "
                f"{s['04_sft']['losses'][0]:.2f} -> {s['04_sft']['losses'][-1]:.2f}"
            ),
            "s": s["04_sft"]["seconds"],
        },
        {
            "step": "5 long context",
            "result": s["05_long"]["headline"],
            "s": s["05_long"]["seconds"],
        },
        {
            "step": "6 merge + stock load",
            "result": (f"max |logit diff| {s['06_merge']['max_logit_diff']:.2e}"),
            "s": s["06_merge"]["seconds"],
        },
        {
            "step": "7 speculative",
            "result": (
                f"{s['07_spec']['speedup']:.2f}x, acceptance {s['07_spec']['acceptance']:.0%}, "
                f"{s['07_spec']['tokens_per_forward']:.2f} tokens/target forward, "
                f"greedy identical: {s['07_spec']['identical']}"
            ),
            "s": s["07_spec"]["seconds"],
        },
    ]
    print("\n=== Summary ===")
    print(table(rows, ["step", "result", "s"]))
    print(f"wall time {wall:.0f} s; plots in {run.root}")


if __name__ == "__main__":
    sys.exit(main())
