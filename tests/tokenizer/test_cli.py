from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llamazh.cli import command, main


def test_train_merge_report(tmp_path, llama2_model_path, corpus_path, capsys):
    text = tmp_path / "zh.txt"
    lines = corpus_path("zh_d2l.txt").read_text(encoding="utf-8").splitlines()[:800]
    text.write_text("\n".join(lines), encoding="utf-8")
    model = tmp_path / "zh.model"
    argv = ["train-tokenizer", str(text), "-o", str(model), "--vocab-size", "1200"]
    assert main([*argv, "--character-coverage", "0.99"]) == 0
    assert model.is_file()

    out = tmp_path / "merged"
    argv = ["merge-tokenizer", str(llama2_model_path), str(model), str(out), "--scores", "rank"]
    assert main([*argv, "--pad-to-multiple", "64", "--cjk-only"]) == 0
    printed = capsys.readouterr().out
    assert "merged (rank): 32000 base" in printed and "filtered out" in printed
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer.json").is_file()

    assert main(["tokenizer-report", str(llama2_model_path), str(out), "--text", str(text)]) == 0
    table = capsys.readouterr().out
    assert "llama2" in table and "merged" in table and "zh" in table
    assert main(["tokenizer-report", str(out), "--text", str(text), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["merged"]) == {"zh"}

    # an existing OUT is refused before anything is written
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "merge-tokenizer: error: OUT=" in err and "already exists" in err


def test_user_errors_exit_2(tmp_path, llama2_model_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    assert main(["merge-tokenizer", str(llama2_model_path), str(bad), str(tmp_path / "o")]) == 2
    assert "extra=" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["merge-tokenizer", "--scores", "best"])


def test_registry_refuses_duplicates():
    import llamazh.tokenizer.commands  # noqa: F401  (registers)

    with pytest.raises(ValueError, match="already registered"):
        command("merge-tokenizer", help="x")(lambda parser: None)


def test_python_dash_m(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "llamazh", "--help"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0 and "merge-tokenizer" in run.stdout


def test_extend_tokenizer(tmp_path, corpus_path, capsys):
    from pathlib import Path

    from transformers import AutoTokenizer

    smollm2 = Path(__file__).resolve().parent.parent / "fixtures" / "smollm2_tokenizer"
    text = tmp_path / "zh.txt"
    lines = corpus_path("zh_d2l.txt").read_text(encoding="utf-8").splitlines()[:600]
    text.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "ext"
    argv = ["extend-tokenizer", str(smollm2), str(out), "--text", str(text), "--new-tokens"]
    assert main([*argv, "300", "--text", str(corpus_path("en_d2l.txt"))]) == 0
    printed = capsys.readouterr().out
    assert "49152 base + 300 new tokens = 49452" in printed and "first new tokens:" in printed
    assert "extended" in printed and "en_d2l" in printed and "zh" in printed
    assert len(AutoTokenizer.from_pretrained(str(out))) == 49452
    assert (
        main(["tokenizer-report", str(out), str(out / "tokenizer.json"), "--text", str(text)]) == 0
    )
    capsys.readouterr()

    # an existing OUT, a corpus too small, a tokenizer that is not byte-level BPE: exit 2
    assert main([*argv, "300"]) == 2
    assert "OUT=" in capsys.readouterr().err
    assert main([*argv[:2], str(tmp_path / "big"), *argv[3:], "900000"]) == 2
    assert "is more than this text supports" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()
    assert main([argv[0], str(tmp_path), str(tmp_path / "o"), *argv[3:], "10"]) == 2
    assert "without a tokenizer.json" in capsys.readouterr().err
    assert main([*argv[:2], str(tmp_path / "z"), *argv[3:], "0"]) == 2
    assert "new_tokens must be >= 1" in capsys.readouterr().err
