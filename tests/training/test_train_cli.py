"""``llamazh train pt|sft`` on a tiny model: a few steps, an adapter out that merge_adapters
takes, an extended tokenizer resized in, bad input refused before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamazh.cli import main
from llamazh.training.train import check_deepspeed_config

pytestmark = pytest.mark.usefixtures("trainer_runs")
ROOT = Path(__file__).resolve().parents[2]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus_path) -> Path:
    """A tiny Llama with a small byte-level BPE tokenizer (ChatML specials), text and SFT data,
    and an extended copy of the tokenizer (4 added Chinese words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llamazh.testing import tiny_llama

    root = tmp_path_factory.mktemp("train_cli")
    lines = Path(corpus_path("zh_d2l.txt")).read_text(encoding="utf-8").splitlines()[:200]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2], pad_token=SPECIALS[2]
    )
    tiny_llama(vocab_size=len(hf), tie_word_embeddings=True).save_pretrained(root / "model")
    hf.save_pretrained(root / "model")
    hf.add_tokens(["深度学习", "神经网络", "梯度下降", "模型"])
    hf.save_pretrained(root / "extended")
    (root / "zh.txt").write_text("\n".join(lines[:60]), encoding="utf-8")
    records = [{"instruction": line[:20], "output": line[20:60]} for line in lines[:16]]
    (root / "sft.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return root


def _argv(workdir: Path, stage: str, out: Path, *extra: str) -> list[str]:
    data = workdir / ("zh.txt" if stage == "pt" else "sft.json")
    return [
        "train", stage, "--model", str(workdir / "model"), "--data", str(data), "-o", str(out),
        "--max-steps", "2", "--save-steps", "1", "--block-size", "64", "--rank", "4",
        "--alpha", "8", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "extra"),
    [("pt", ()), ("pt", ("--embeddings", "new_rows")), ("sft", ("--template", "chatml"))],
)
def test_train_writes_an_adapter_merge_takes(tmp_path, workdir, stage, extra):
    from transformers import AutoModelForCausalLM

    from llamazh.training import merge_adapters

    if "new_rows" in extra:
        extra = (*extra, "--tokenizer", str(workdir / "extended"))
    out = tmp_path / "run"
    assert main(_argv(workdir, stage, out, *extra)) == 0
    assert (out / "adapter_config.json").is_file()
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.05)
    merge_adapters(workdir / "model", out, tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    vocab = 404 if "new_rows" in extra else 400
    assert merged.get_input_embeddings().weight.shape[0] == vocab


def test_bad_input_is_refused_before_training(tmp_path, workdir, capsys):
    out = tmp_path / "run"
    assert main(_argv(workdir, "pt", out, "--embeddings", "new_rows")) == 2
    assert "--tokenizer EXTENDED_DIR" in capsys.readouterr().err
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert main(_argv(workdir, "pt", out, "--deepspeed", str(ds))) == 2
    assert "stage3_gather_16bit_weights_on_model_save" in capsys.readouterr().err
    for shipped in ("zero2.json", "zero3.json"):  # the example configs pass the check
        check_deepspeed_config(ROOT / "examples" / "deepspeed" / shipped)
    assert main(_argv(workdir, "pt", out, "--resume", str(workdir / "model"))) == 2
    assert "not an adapter checkpoint" in capsys.readouterr().err
    assert main(_argv(workdir, "sft", out, "--template", "nope")) == 2
    assert "nope" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="no distributed")
def test_train_under_torchrun_two_processes(tmp_path, workdir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "llamazh"]
    proc = subprocess.run(
        [*cmd, *_argv(workdir, "pt", tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
