"""Vocabulary extension benchmark: tokens per character before and after the Chinese merge.

Trains a ~20,000-piece Chinese vocabulary on zh_d2l (minus its last tenth, held out) and
zh_classical, merges it into Llama-2's in both score modes, and measures tokens/char on the
held-out modern Chinese, on zh_classical (seen in training) and on en_d2l (unseen English),
next to Llama-2 and the published Chinese-LLaMA figures (NOTES.md, whole zh_d2l). Also: the
time to merge and to export, and how often the seed-mode fast tokenizer disagrees with
sentencepiece (the rank-mode one never does; see llamazh/tokenizer/export.py).

Counting: tokens without BOS over Unicode characters without newlines, per non-empty line.

    python benchmarks/tokenizer_efficiency.py [--vocab-size 20000] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import platform
import subprocess
import time
import warnings
from pathlib import Path

import sentencepiece as spm

from llamazh.testing import data_path
from llamazh.tokenizer import (
    encoding_efficiency,
    export_hf_tokenizer,
    has_cjk,
    merge_sentencepiece,
    train_sentencepiece,
)

# NOTES.md, on the whole of data/corpus/zh_d2l.txt (their counting).
PUBLISHED = {"llama2": 0.462, "chinese-llama (49,953)": 0.316, "chinese-llama-2 (55,296)": 0.319}


def lines_of(name: str) -> list[str]:
    path = data_path(f"corpus/{name}.txt")
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def git_sha() -> str:
    try:
        run = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return run.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def disagreement(hf, sp, lines: list[str]) -> tuple[int, int, int]:
    """(lines that differ, tokens sentencepiece emits on them, tokens the fast one emits)."""
    got = hf(lines, add_special_tokens=False).input_ids
    want = sp.encode(lines)
    bad = [(g, w) for g, w in zip(got, want) if g != w]
    return len(bad), sum(len(w) for _, w in bad), sum(len(g) for g, _ in bad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=20000)
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    run = Path(
        args.run_dir or f"benchmarks/results/tokenizer_efficiency-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run.mkdir(parents=True, exist_ok=True)

    zh = lines_of("zh_d2l")
    cut = len(zh) - len(zh) // 10
    train_txt = run / "train_zh.txt"
    train_txt.write_text("\n".join(zh[:cut] + lines_of("zh_classical")) + "\n", encoding="utf-8")
    texts = {
        "zh_d2l held-out": zh[cut:],
        "zh_classical": lines_of("zh_classical"),
        "en_d2l": lines_of("en_d2l"),
    }
    llama2 = data_path("tokenizers/llama2.model")

    t0 = time.perf_counter()
    extra = train_sentencepiece(
        train_txt, run / "zh.model", vocab_size=args.vocab_size, overwrite=True
    )
    t_train = time.perf_counter() - t0
    merged, timings = {}, {}
    from transformers import AutoTokenizer

    hf = {}
    for mode in ("seed", "rank", "rank+cjk"):
        t0 = time.perf_counter()
        keep = has_cjk if mode.endswith("cjk") else None
        merged[mode] = merge_sentencepiece(
            llama2, extra, scores=mode.split("+")[0], piece_filter=keep
        )
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = export_hf_tokenizer(merged[mode], run / f"tokenizer-{mode}", overwrite=True)
        t2 = time.perf_counter()
        timings[mode] = (t1 - t0, t2 - t1)
        hf[mode] = AutoTokenizer.from_pretrained(str(out))

    toks = {
        "llama2": llama2,
        "chinese (standalone)": extra,
        "merged seed (sentencepiece)": merged["seed"],
        "merged seed (fast tokenizer)": hf["seed"],
        "merged rank": merged["rank"],
        "merged rank, CJK pieces only": merged["rank+cjk"],
    }
    report = encoding_efficiency(toks, texts)
    whole = encoding_efficiency(
        {"llama2": llama2, "seed": merged["seed"], "rank": merged["rank"]}, {"zh_d2l": zh}
    )

    lines = [
        f"# tokenizer efficiency ({platform.node()}, CPU timings are noisy on shared cores)",
        "",
    ]
    lines.append(
        f"Chinese vocabulary: {args.vocab_size} pieces, trained in {t_train:.1f} s "
        f"on {cut} zh_d2l lines + zh_classical"
    )
    for mode in ("seed", "rank", "rank+cjk"):
        m, e = timings[mode]
        lines.append(f"{merged[mode]}; merge {m:.2f} s, export {e:.2f} s")
    lines += ["", report.table(), ""]
    held = "zh_d2l held-out"
    base = report.get("llama2", held).tokens_per_char
    base_en = report.get("llama2", "en_d2l").tokens_per_char
    for name in ("merged seed (sentencepiece)", "merged rank", "merged rank, CJK pieces only"):
        r_zh = base / report.get(name, held).tokens_per_char
        d_en = report.get(name, "en_d2l").tokens_per_char / base_en - 1
        ok = "PASS" if r_zh >= 1.45 and abs(d_en) <= 0.01 else "FAIL"
        lines.append(
            f"{name}: {r_zh:.3f}x fewer tokens than Llama-2 on held-out zh (target >= 1.45x), "
            f"English {100 * d_en:+.2f}% (target within 1%): {ok}"
        )
    lines += [
        "",
        "whole zh_d2l (training text included), next to the published figures (NOTES.md):",
    ]
    for name in ("llama2", "seed", "rank"):
        lines.append(f"  ours {name:<8} {whole.get(name, 'zh_d2l').tokens_per_char:.4f}")
    for name, value in PUBLISHED.items():
        lines.append(f"  published {name:<26} {value:.3f}")
    lines += [
        "",
        "seed-mode fast tokenizer vs sentencepiece (the rank-mode one agrees on every line):",
    ]
    sp_seed = spm.SentencePieceProcessor(model_proto=merged["seed"].proto.SerializeToString())
    sp_rank = spm.SentencePieceProcessor(model_proto=merged["rank"].proto.SerializeToString())
    for name, tx in texts.items():
        n, sp_t, hf_t = disagreement(hf["seed"], sp_seed, tx)
        r, _, _ = disagreement(hf["rank"], sp_rank, tx)
        lines.append(
            f"  {name:<16} seed: {n}/{len(tx)} lines differ ({sp_t} sp tokens vs {hf_t} "
            f"fast tokens on them); rank: {r} lines differ"
        )
    text = "\n".join(lines)
    print(text)
    (run / "table.txt").write_text(text + "\n", encoding="utf-8")
    import tokenizers
    import transformers

    with (run / "results.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "tokenizer",
                "texts",
                "tokens_per_char",
                "byte_fallback_rate",
                "device",
                "transformers",
                "tokenizers",
                "sentencepiece",
                "git",
            ]
        )
        for row in report.rows:
            w.writerow(
                [
                    row.tokenizer,
                    row.texts,
                    f"{row.tokens_per_char:.5f}",
                    f"{row.byte_fallback_rate:.5f}",
                    platform.processor() or "cpu",
                    transformers.__version__,
                    tokenizers.__version__,
                    spm.__version__,
                    git_sha(),
                ]
            )
    print(f"\nwrote {run}")


if __name__ == "__main__":
    main()
