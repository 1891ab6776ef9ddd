"""``llamazh`` subcommands for vocabulary extension: train-tokenizer, merge-tokenizer,
extend-tokenizer, tokenizer-report."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from llamazh.cli import Handler, add_text_option, command, progress


@command("train-tokenizer", help="train a SentencePiece model suited to a LLaMA merge")
def _train(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text, one line each")
    parser.add_argument("-o", "--output", required=True, help="the .model file to write")
    parser.add_argument("--vocab-size", type=int, default=20000, help="pieces to learn")
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=None,
        help="share of characters the pieces must cover (None: llamazh's default for Chinese)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")

    def run(args: argparse.Namespace) -> int:
        from llamazh.tokenizer import train_sentencepiece

        extra = {}
        if args.character_coverage is not None:
            extra["character_coverage"] = args.character_coverage
        progress(
            f"training a {args.vocab_size}-piece SentencePiece model on {len(args.files)} file(s)"
        )
        out = train_sentencepiece(
            args.files, args.output, vocab_size=args.vocab_size, overwrite=args.overwrite, **extra
        )
        print(f"wrote {out}")
        return 0

    return run


@command(
    "merge-tokenizer",
    help="merge EXTRA into BASE and write OUT as a Hugging Face tokenizer directory",
)
def _merge(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("base", metavar="BASE", help="base SentencePiece .model (e.g. Llama-2)")
    parser.add_argument("extra", metavar="EXTRA", help="SentencePiece .model to add")
    parser.add_argument("out", metavar="OUT", help="directory to create")
    parser.add_argument(
        "--scores",
        choices=("seed", "rank"),
        default="rank",
        help="rank (default): the exported fast tokenizer encodes exactly like sentencepiece; "
        "seed: the original Chinese-LLaMA scores (all 0), which no fast tokenizer reproduces",
    )
    parser.add_argument(
        "--pad-to-multiple",
        type=int,
        default=None,
        metavar="N",
        help="append unused pieces until the size is a multiple of N (e.g. 64)",
    )
    parser.add_argument("--pad-token", default=None, help="an existing piece to pad with")
    parser.add_argument(
        "--cjk-only",
        action="store_true",
        help="append only pieces holding a CJK character (English stays tokenized as in BASE)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    def run(args: argparse.Namespace) -> int:
        from llamazh.tokenizer import export_hf_tokenizer, has_cjk, merge_sentencepiece

        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"OUT={args.out!r} already exists; pass --overwrite")
        progress("merging (tens of seconds for a 20,000-piece EXTRA)")
        result = merge_sentencepiece(
            args.base,
            args.extra,
            scores=args.scores,
            pad_to_multiple=args.pad_to_multiple,
            piece_filter=has_cjk if args.cjk_only else None,
        )
        export_hf_tokenizer(result, args.out, pad_token=args.pad_token, overwrite=args.overwrite)
        print(result)
        print(f"wrote {args.out}")
        return 0

    return run


@command("tokenizer-report", help="tokens per character of tokenizers on text files")
def _report(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument(
        "tokenizers",
        nargs="+",
        metavar="TOKENIZER",
        help="a SentencePiece .model, a Hugging Face tokenizer directory or a tokenizer.json",
    )
    add_text_option(parser, "UTF-8 text files to measure on, one text per line")
    parser.add_argument("--json", action="store_true", help="print the dict form as JSON")

    def run(args: argparse.Namespace) -> int:
        from llamazh.tokenizer import encoding_efficiency

        toks: dict[str, Any] = {}
        for spec in args.tokenizers:
            path = Path(spec)
            name = path.name if path.is_dir() else path.stem
            toks[name if name not in toks else spec] = _load_tokenizer(path)
        texts = {Path(t).stem: t for t in args.text}
        report = encoding_efficiency(toks, texts)
        print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
        return 0

    return run


def _load_tokenizer(path: Path) -> Any:
    if path.suffix == ".json" and path.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    if path.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"TOKENIZER {str(path)!r} is neither a .model file nor a directory")
    return path


@command(
    "extend-tokenizer",
    help="learn new merges on text and append them to a byte-level BPE tokenizer",
)
def _extend(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument(
        "base", metavar="BASE", help="a Hugging Face tokenizer directory or a tokenizer.json"
    )
    parser.add_argument("out", metavar="OUT", help="the tokenizer directory to create")
    add_text_option(parser, "UTF-8 training text files, one text per line")
    parser.add_argument(
        "--new-tokens", type=int, default=20000, metavar="N", help="merges to learn"
    )
    parser.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        metavar="K",
        help="a pair must occur at least K times to be merged",
    )
    parser.add_argument(
        "--scope",
        choices=("cjk", "non_ascii", "all"),
        default="cjk",
        help="which pairs may merge (cjk: English keeps the base's tokens)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    def run(args: argparse.Namespace) -> int:
        import time

        from llamazh.tokenizer import encoding_efficiency, extend_bpe
        from llamazh.tokenizer._bytelevel import load_base

        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"OUT={args.out!r} already exists; pass --overwrite")
        _refuse_sentencepiece(Path(args.base))
        start = time.perf_counter()
        progress(
            f"learning {args.new_tokens} merges on {len(args.text)} file(s) "
            "(about 30 s for 20,000 on 2 cores)"
        )
        with contextlib.redirect_stdout(sys.stderr):  # extend_bpe's progress lines
            ext = extend_bpe(
                args.base,
                [Path(t) for t in args.text],
                new_tokens=args.new_tokens,
                min_frequency=args.min_frequency,
                scope=args.scope,
                show_progress=True,
            )
        seconds = time.perf_counter() - start
        ext.save(args.out, overwrite=args.overwrite)
        print(f"{ext}; learned in {seconds:.1f} s")
        shown = [t for t in ext.new_token_text() if "\ufffd" not in t]
        print("first new tokens:", " ".join(repr(t) for t in shown[:12]))
        print("last new tokens: ", " ".join(repr(t) for t in shown[-12:]))
        progress("measuring tokens per character, base vs extended")
        base = load_base(args.base, "BASE").tokenizer
        texts = {Path(t).stem: t for t in args.text}
        print(encoding_efficiency({"base": base, "extended": ext}, texts).table())
        print(f"wrote {args.out}")
        return 0

    return run


def _refuse_sentencepiece(path: Path) -> None:
    """A SentencePiece ``.model`` where byte-level BPE is expected: say so, not 'bad UTF-8'."""
    candidate = path / "tokenizer.model" if path.is_dir() else path
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return
    if candidate.is_file() and (candidate.suffix == ".model" or _is_sentencepiece(candidate)):
        raise ValueError(
            f"BASE={str(path)!r} is a SentencePiece model; extend-tokenizer extends byte-level "
            "BPE tokenizers (a tokenizer.json or its directory: SmolLM2, Llama-3). For "
            "SentencePiece (Llama-2) train a model with train-tokenizer and use merge-tokenizer"
        )


def _is_sentencepiece(path: Path) -> bool:
    try:
        path.read_bytes()[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
