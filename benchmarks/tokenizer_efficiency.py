"""Vocabulary extension benchmark: tokens per character before and after the Chinese merge.

Trains a ~20,000-piece Chinese vocabulary on zh_d2l (minus its last tenth, held out) and
zh_classical, merges it into Llama-2's in both score modes, and measures tokens/char on the
held-out modern Chinese, on zh_classical (seen in training) and on en_d2l (unseen English),
next to Llama-2 and the published Chinese-LLaMA figures (NOTES.md, whole zh_d2l). Also: the
time to merge and to export, and how often the seed-mode fast tokenizer disagrees with
sentencepiece (the rank-mode one never does, nor does the default seed export through
transformers' SentencePieceBackend; see llamazh/tokenizer/export.py).

BPE rows (``--part bpe``): SmolLM2's byte-level BPE tokenizer extended by ``extend_bpe`` with
``--bpe-new-tokens`` (20,000) tokens under the held-out protocol of
``llamazh.tokenizer.chinese_held_out_split`` (first tenth of the CJK-heavy zh_d2l lines and the
first 2,000 zh_classical lines held out), next to the base and a standalone byte-level BPE of
the same size trained from scratch on the same text; the training time, the reachability of
the new tokens and whether English encodes line for line as with the base.

Counting: tokens without BOS over Unicode characters without newlines, per non-empty line.

    python benchmarks/tokenizer_efficiency.py [--part all|sentencepiece|bpe] [--vocab-size 20000]
        [--bpe-new-tokens 20000] [--bpe-base DIR] [--run-dir DIR]
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
    chinese_held_out_split,
    encoding_efficiency,
    export_hf_tokenizer,
    extend_bpe,
    has_cjk,
    merge_sentencepiece,
    train_sentencepiece,
)

SMOLLM2_TOKENIZER = Path(__file__).resolve().parent.parent / "tests/fixtures/smollm2_tokenizer"

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


def bpe_section(run: Path, new_tokens: int, base_dir: Path) -> tuple[list[str], list]:
    """Extend SmolLM2's tokenizer; returns the printed lines and the efficiency rows."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    split = chinese_held_out_split()
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    t0, c0 = time.perf_counter(), time.process_time()
    ext = extend_bpe(base_dir, split.train, new_tokens=new_tokens)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ext.save(run / "smollm2-extended", overwrite=True)

    scratch = Tokenizer.from_str(base.to_str())  # same pre-tokenizer and decoder, no merges
    trainer = trainers.BpeTrainer(
        vocab_size=256 + new_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    scratch.train_from_iterator(list(split.train), trainer)
    texts = {f"{k} (held out)" if k != "en_d2l" else k: list(v) for k, v in split.held_out.items()}
    report = encoding_efficiency(
        {"smollm2": base, "smollm2 + extend_bpe": ext, "standalone BPE": scratch}, texts
    )
    fraction, missed = ext.reachability()
    en = list(split.held_out["en_d2l"])
    same = sum(
        a.ids == b.ids
        for a, b in zip(
            base.encode_batch(en, add_special_tokens=False),
            ext.tokenizer.encode_batch(en, add_special_tokens=False),
        )
    )
    lines = [
        "",
        f"## byte-level BPE: {ext}",
        f"{split}",
        f"extend_bpe: {wall:.1f} s wall, {cpu:.1f} s CPU (one process; tokenizers' pre-tokenizer "
        "and model, the merge loop in Python)",
        "",
        report.table(),
        "",
    ]
    targets = {"zh_d2l (held out)": 2.2, "zh_classical (held out)": 2.0}
    for name, target in targets.items():
        ratio = report.get("smollm2", name).tokens / report.get("smollm2 + extend_bpe", name).tokens
        ok = "PASS" if ratio >= target else "FAIL"
        lines.append(f"{name}: {ratio:.2f}x fewer tokens (target >= {target}x): {ok}")
    ok = "PASS" if same == len(en) else "FAIL"
    lines.append(f"en_d2l: {same}/{len(en)} lines encode to identical ids: {ok}")
    lines.append(
        f"reachable: {100 * fraction:.2f}% of the whole-character new tokens encode alone to "
        f"themselves ({len(missed)} do not, e.g. {missed[:5]})"
    )
    return lines, list(report.rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "sentencepiece", "bpe"), default="all")
    parser.add_argument("--vocab-size", type=int, default=20000)
    parser.add_argument("--bpe-new-tokens", type=int, default=20000)
    parser.add_argument("--bpe-base", type=Path, default=SMOLLM2_TOKENIZER)
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    run = Path(
        args.run_dir or f"benchmarks/results/tokenizer_efficiency-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run.mkdir(parents=True, exist_ok=True)
    lines, rows = [f"# tokenizer efficiency ({platform.node()}, CPU timings are noisy)"], []
    if args.part in ("all", "sentencepiece"):
        more, more_rows = sentencepiece_section(run, args.vocab_size)
        lines += more
        rows += more_rows
    if args.part in ("all", "bpe"):
        more, more_rows = bpe_section(run, args.bpe_new_tokens, args.bpe_base)
        lines += more
        rows += more_rows
    text = "\n".join(lines)
    print(text)
    (run / "table.txt").write_text(text + "\n", encoding="utf-8")
    write_csv(run / "results.csv", rows)
    print(f"\nwrote {run}")


def sentencepiece_section(run: Path, vocab_size: int) -> tuple[list[str], list]:
    """Train, merge into Llama-2 (both score modes), export; the printed lines and rows."""
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
    extra = train_sentencepiece(train_txt, run / "zh.model", vocab_size=vocab_size, overwrite=True)
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
            out = export_hf_tokenizer(
                merged[mode], run / f"tokenizer-{mode}", backend="fast", overwrite=True
            )
        t2 = time.perf_counter()
        timings[mode] = (t1 - t0, t2 - t1)
        hf[mode] = AutoTokenizer.from_pretrained(str(out))
    # the default export of a seed merge: transformers' SentencePieceBackend, exact
    out = export_hf_tokenizer(merged["seed"], run / "tokenizer-seed-sp", overwrite=True)
    hf["seed-sp"] = AutoTokenizer.from_pretrained(str(out))

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

    lines = ["", "## SentencePiece merge into Llama-2"]
    lines.append(
        f"Chinese vocabulary: {vocab_size} pieces, trained in {t_train:.1f} s "
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
        "seed-mode fast tokenizer vs sentencepiece (the rank-mode one and the default seed "
        "export, SentencePieceBackend, agree on every line):",
    ]
    sp_seed = spm.SentencePieceProcessor(model_proto=merged["seed"].proto.SerializeToString())
    sp_rank = spm.SentencePieceProcessor(model_proto=merged["rank"].proto.SerializeToString())
    for name, tx in texts.items():
        n, sp_t, hf_t = disagreement(hf["seed"], sp_seed, tx)
        r, _, _ = disagreement(hf["rank"], sp_rank, tx)
        e, _, _ = disagreement(hf["seed-sp"], sp_seed, tx)
        lines.append(
            f"  {name:<16} seed: {n}/{len(tx)} lines differ ({sp_t} sp tokens vs {hf_t} "
            f"fast tokens on them); rank: {r}; seed via SentencePieceBackend: {e}"
        )
    return lines, list(report.rows)


def write_csv(path: Path, rows: list) -> None:
    import tokenizers
    import transformers

    with path.open("w", newline="", encoding="utf-8") as fh:
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
        for row in rows:
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


if __name__ == "__main__":
    main()
