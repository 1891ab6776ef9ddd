"""Extend the Llama-2 vocabulary with Chinese, the first step of the Chinese-LLaMA recipe.

Trains a Chinese SentencePiece vocabulary on the bundled corpora, merges it into Llama-2's
tokenizer, writes a Hugging Face tokenizer directory and prints how many tokens each
tokenizer spends per character. A minute or so on 2 CPU cores.

    python examples/extend_vocabulary.py --out-dir runs/extend_vocabulary --vocab-size 20000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llamazh.testing import data_path
from llamazh.tokenizer import (
    encoding_efficiency,
    export_hf_tokenizer,
    has_cjk,
    merge_sentencepiece,
    train_sentencepiece,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/extend_vocabulary")
    parser.add_argument("--vocab-size", type=int, default=20000)
    parser.add_argument("--scores", choices=("seed", "rank"), default="rank")
    args = parser.parse_args()

    llama2 = data_path("tokenizers/llama2.model")
    corpora = {name: data_path(f"corpus/{name}.txt") for name in ("zh_d2l", "zh_classical")}
    english = data_path("corpus/en_d2l.txt")
    if llama2 is None or english is None or None in corpora.values():
        raise SystemExit("the bundled data/ directory is missing; run from a clone of llamazh")
    out = Path(args.out_dir)

    start = time.perf_counter()
    zh_model = train_sentencepiece(
        list(corpora.values()), out / "zh.model", vocab_size=args.vocab_size, overwrite=True
    )
    print(f"trained {zh_model} in {time.perf_counter() - start:.1f} s")

    # Rank scores make the fast tokenizer.json encode exactly like sentencepiece; appending
    # only pieces with a CJK character leaves English tokenized exactly as by Llama-2.
    merged = merge_sentencepiece(llama2, zh_model, scores=args.scores, piece_filter=has_cjk)
    print(merged)
    tokenizer_dir = export_hf_tokenizer(merged, out / "tokenizer", overwrite=True)
    print(f"wrote {tokenizer_dir} (load it with AutoTokenizer.from_pretrained)")

    report = encoding_efficiency(
        {"llama2": llama2, "chinese": zh_model, "merged": merged},
        {**corpora, "en_d2l": english},
    )
    print()
    print(report.table())


if __name__ == "__main__":
    main()
