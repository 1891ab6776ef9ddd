"""The command line as a whole: help and defaults everywhere, one --text convention, the
merge-adapters and export-gguf subcommands, clear messages for the wrong tokenizer kind."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from llamazh.cli import build_parser, main

SMOLLM2 = Path(__file__).resolve().parent / "fixtures" / "smollm2_tokenizer"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_shows_its_default():
    subs = _subparsers()
    assert {"merge-adapters", "export-gguf", "extend-tokenizer", "tokenizer-report"} <= set(subs)
    for name, sub in subs.items():
        assert sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = sub.format_help()
        if any(a.option_strings and a.default is not None for a in sub._actions[1:]):
            assert "(default:" in text, name
    assert "``" not in build_parser().format_help()  # no raw reST in the description


def test_text_is_repeatable_and_takes_several_files_everywhere():
    subs = _subparsers()
    for name in ("tokenizer-report", "extend-tokenizer"):
        args = subs[name].parse_args(["A", "B", "--text", "a.txt", "b.txt", "--text", "c.txt"])
        assert args.text == ["a.txt", "b.txt", "c.txt"], name


def test_sentencepiece_model_given_to_extend_tokenizer(tmp_path, llama2_model_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("你好\n", encoding="utf-8")
    for base in (llama2_model_path, tmp_path / "spdir"):
        if base == tmp_path / "spdir":
            base.mkdir()
            shutil.copy(llama2_model_path, base / "tokenizer.model")
        argv = ["extend-tokenizer", str(base), str(tmp_path / "o"), "--text", str(text)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is a SentencePiece model" in err and "merge-tokenizer" in err
        assert "utf-8" not in err.lower()
    assert not (tmp_path / "o").exists()


def _tiny_model_dir(path: Path, *, tied: bool = True) -> Path:
    from llamazh.testing import tiny_llama

    model = tiny_llama(seed=0, vocab_size=49152, tie_word_embeddings=tied)
    model.save_pretrained(str(path))
    for f in SMOLLM2.iterdir():
        shutil.copy(f, path / f.name)
    return path


def test_merge_adapters_then_export_gguf(tmp_path, capsys):
    pytest.importorskip("gguf", reason="export-gguf needs gguf: pip install 'llamazh[real]'")
    from transformers import AutoModelForCausalLM

    from llamazh.training import prepare_for_training, save_adapter

    base = _tiny_model_dir(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    prepared = prepare_for_training(model, rank=4, alpha=8)
    with torch.no_grad():
        for group in prepared.named_trainable().values():
            for _, p in group:
                p.add_(0.1)
    save_adapter(prepared, tmp_path / "adapter")
    merged = tmp_path / "merged"
    assert main(["merge-adapters", str(base), str(tmp_path / "adapter"), "-o", str(merged)]) == 0
    assert f"wrote {merged}" in capsys.readouterr().out
    assert (merged / "tokenizer.json").is_file()

    out = tmp_path / "m.q8.gguf"
    assert main(["export-gguf", str(merged), str(out), "--dtype", "q8_0"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "exporting" in captured.err
    assert out.stat().st_size > 0
    assert main(["export-gguf", str(merged), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(["merge-adapters", str(base), str(tmp_path / "nothing"), "-o", str(tmp_path / "x")])
        == 2
    )
    assert "adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()
