"""``llamazh train pt`` / ``llamazh train sft``: the seeds' two training scripts
(Chinese-LLaMA-Alpaca-2's ``run_clm_pt_with_peft.py`` and ``run_clm_sft_with_peft.py``) on
transformers' ``Trainer``, with the seeds' defaults.

* LoRA r=64, alpha=128, dropout 0.05 on q, k, v, o, gate, up, down; embeddings and lm_head
  trained in full (``--embeddings new_rows`` trains only the rows a tokenizer extension added);
* pre-training: each line of a text file (or the ``text`` field of a JSON record) is one
  document, EOS after every document, cut into blocks of 512; learning rate 2e-4;
* SFT: Alpaca / ShareGPT / chat records rendered with any registered template
  (``llamazh.templates``), the prompt masked out of the loss; learning rate 1e-4;
* a tokenizer longer than the model's vocabulary is an extension: the model is resized
  (``llamazh.tokenizer.resize_embeddings``) before LoRA is added;
* ``--deepspeed CONFIG`` (ZeRO-2/ZeRO-3 examples in ``examples/deepspeed/``), ``torchrun`` or
  ``accelerate launch -m llamazh train ...``: whatever ``Trainer`` runs under.

The output directory (and every ``checkpoint-N`` in it) is a PEFT adapter with the tokenizer:
``merge_adapters(base, output, merged)`` takes it, ``--resume`` continues from a checkpoint.
Everything the run needs is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamazh.cli import Handler, command

DEFAULTS = {"pt": {"lr": 2e-4}, "sft": {"lr": 1e-4}}


@dataclass(frozen=True)
class RunConfig:
    """What one ``llamazh train`` run does (the parsed command line)."""

    stage: str
    model: Path
    data: tuple[Path, ...]
    output: Path
    tokenizer: Path | None = None
    template: str = "alpaca2"
    block_size: int = 512
    max_length: int = 512
    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    embeddings: str = "full"
    lr: float | None = None
    batch_size: int = 1
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = -1
    save_steps: int = 500
    seed: int = 42
    deepspeed: Path | None = None
    resume: Path | None = None
    gradient_checkpointing: bool = False


def check_deepspeed_config(path: Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and refuse what a prepared model cannot run under.

    Raises:
        FileNotFoundError: no such file. ValueError: not JSON, or ZeRO-3 without
            ``stage3_gather_16bit_weights_on_model_save`` (the adapter could not be gathered).
    """
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed {str(path)!r}: no such file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--deepspeed {str(path)!r} is not JSON: {err}") from err
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ValueError(
            f"--deepspeed {str(path)!r} uses ZeRO-3 without zero_optimization."
            "stage3_gather_16bit_weights_on_model_save=true: checkpoints would hold partitions, "
            "not the adapter; set it (see examples/deepspeed/zero3.json)"
        )
    return config


def trainer_problem() -> str | None:
    """Why transformers' ``Trainer`` cannot run with the installed accelerate, or None.

    transformers' Trainer calls ``Accelerator.unwrap_model(..., keep_torch_compile=False)``,
    which accelerate 1.1-1.3 lack (detected by signature, not by version number).

    Example:
        >>> trainer_problem() is None  # a recent accelerate
        True
    """
    import inspect

    try:
        from accelerate import Accelerator
    except ImportError:
        return "transformers' Trainer needs accelerate: pip install accelerate"
    if "keep_torch_compile" not in inspect.signature(Accelerator.unwrap_model).parameters:
        return (
            "transformers' Trainer passes keep_torch_compile to accelerate's unwrap_model, which "
            "the installed accelerate lacks: pip install -U accelerate"
        )
    return None


def check_run(cfg: RunConfig) -> None:
    """Every check that needs no model: files exist, the output is free, values in range."""
    problem = trainer_problem()
    if problem:
        raise ValueError(problem)
    if cfg.stage not in DEFAULTS:
        raise ValueError(f"stage must be 'pt' or 'sft', got {cfg.stage!r}")
    if not (cfg.model / "config.json").is_file():
        raise FileNotFoundError(f"--model {str(cfg.model)!r} has no config.json")
    for path in cfg.data:
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if cfg.output.exists() and any(cfg.output.iterdir()) and cfg.resume is None:
        raise FileExistsError(
            f"--output {str(cfg.output)!r} is not empty; choose another or pass --resume"
        )
    if cfg.resume is not None and not (cfg.resume / "adapter_config.json").is_file():
        raise ValueError(
            f"--resume {str(cfg.resume)!r} is not an adapter checkpoint (no adapter_config.json);"
            " pass a checkpoint-N directory a llamazh run wrote"
        )
    if cfg.stage == "sft":
        from llamazh.templates import get_template

        get_template(cfg.template)  # raises with the registered names
    if cfg.deepspeed is not None:
        check_deepspeed_config(cfg.deepspeed)


def read_documents(paths: tuple[Path, ...]) -> list[str]:
    """Pre-training text: one document per non-empty line of a text file, or the ``text``
    field of each record of a JSON list / JSON-lines file."""
    docs: list[str] = []
    for path in paths:
        if path.suffix in (".json", ".jsonl"):
            docs.extend(str(r["text"]) for r in read_records(path))
        else:
            docs.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line)
    return docs


def read_records(path: Path) -> list[Any]:
    """Records of a JSON list or a JSON-lines file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"{str(path)!r} must hold a JSON list of records")
    return records


def load_model_and_tokenizer(cfg: RunConfig) -> tuple[Any, Any, list[int]]:
    """The model, the tokenizer and the ids a tokenizer extension added (resized here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(cfg.tokenizer or cfg.model))
    model = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype="auto")
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) < vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}; "
            "pass the tokenizer the model was trained with, or one that extends it"
        )
    new_ids: list[int] = []
    if len(tokenizer) > vocab:
        from llamazh.tokenizer import resize_embeddings

        old = AutoTokenizer.from_pretrained(str(cfg.model))
        new_ids = resize_embeddings(model, old, tokenizer).tolist()
    if cfg.embeddings == "new_rows" and not new_ids:
        raise ValueError(
            "--embeddings new_rows trains the rows a tokenizer extension adds, but the tokenizer "
            f"has the model's {vocab} tokens; pass --tokenizer EXTENDED_DIR or --embeddings full"
        )
    return model, tokenizer, new_ids


def build_dataset(cfg: RunConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """Blocks of ``block_size`` tokens (pt) or template-encoded, prompt-masked examples (sft)."""
    if cfg.stage == "pt":
        from llamazh.training.data import group_into_blocks

        docs = [tokenizer(d)["input_ids"] for d in read_documents(cfg.data)]
        blocks = group_into_blocks(docs, cfg.block_size, eos_token_id=tokenizer.eos_token_id)
        if len(blocks) == 0:
            raise ValueError(f"the data holds fewer than --block-size={cfg.block_size} tokens")
        return [{"input_ids": b, "labels": b.clone()} for b in blocks]
    from llamazh.templates.sft import build_sft_examples

    records = [r for path in cfg.data for r in read_records(path)]
    built = build_sft_examples(cfg.template, tokenizer, records, max_length=cfg.max_length)
    if not built.examples:
        raise ValueError(f"no record fits --max-length={cfg.max_length}")
    return built.examples


def run(cfg: RunConfig) -> Path:
    """Train and write the adapter to ``cfg.output``; returns it.

    Example:
        >>> run(RunConfig("pt", Path("smollm2"), (Path("zh.txt"),), Path("runs/pt"), max_steps=5))
    """
    check_run(cfg)
    from transformers import Trainer, TrainingArguments

    from llamazh.training.data import CausalLMCollator
    from llamazh.training.prepare import prepare_for_training

    model, tokenizer, new_ids = load_model_and_tokenizer(cfg)
    dataset = build_dataset(cfg, tokenizer)
    prepare_for_training(
        model,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        embeddings=cfg.embeddings,
        lm_head=cfg.embeddings,
        new_token_ids=new_ids,
        gradient_checkpointing=cfg.gradient_checkpointing,
        base_model_name_or_path=str(cfg.model),
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    args = TrainingArguments(
        str(cfg.output),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr if cfg.lr is not None else DEFAULTS[cfg.stage]["lr"],
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type="cosine",
        **_warmup(TrainingArguments, 0.05),
        weight_decay=0.0,
        logging_steps=10,
        save_steps=cfg.save_steps,
        seed=cfg.seed,
        report_to=[],
        remove_unused_columns=False,
        deepspeed=str(cfg.deepspeed) if cfg.deepspeed else None,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=CausalLMCollator(pad_token_id=pad),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=str(cfg.resume) if cfg.resume else None)
    trainer.save_model(str(cfg.output))  # the adapter and the tokenizer
    return cfg.output


def _warmup(arguments_class: type, ratio: float) -> dict[str, float]:
    """``warmup_ratio`` where TrainingArguments has it, else a fractional ``warmup_steps``."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(arguments_class)}
    return {"warmup_ratio": ratio} if "warmup_ratio" in names else {"warmup_steps": ratio}


@command("train", help="LoRA training on transformers' Trainer: pt (pre-training) or sft")
def _train(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("stage", choices=sorted(DEFAULTS), help="pt or sft")
    parser.add_argument("--model", type=Path, required=True, help="a transformers model dir")
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="txt/json/jsonl")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the adapter dir")
    parser.add_argument("--tokenizer", type=Path, help="default: the model's (may extend it)")
    parser.add_argument("--template", default="alpaca2", help="sft: a registered template")
    parser.add_argument("--block-size", type=int, default=512, help="pt: tokens per block")
    parser.add_argument("--max-length", type=int, default=512, help="sft: tokens per example")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=128.0, help="LoRA alpha")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    parser.add_argument("--embeddings", choices=("full", "new_rows", "frozen"), default="full",
                        help="how the embedding and lm_head train")  # fmt: skip
    parser.add_argument("--lr", type=float, default=None, help="default 2e-4 (pt), 1e-4 (sft)")
    parser.add_argument("--batch-size", type=int, default=1, help="per device")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: as many as --epochs")
    parser.add_argument("--save-steps", type=int, default=500, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=42, help="Trainer's seed")
    parser.add_argument("--deepspeed", type=Path, help="a DeepSpeed JSON config")
    parser.add_argument("--resume", type=Path, help="a checkpoint-N directory to continue")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in backward (less memory)")  # fmt: skip

    def handler(args: argparse.Namespace) -> int:
        fields = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
        out = run(RunConfig(data=tuple(fields.pop("data")), **fields))
        print(f"wrote the adapter to {out}")
        return 0

    return handler
