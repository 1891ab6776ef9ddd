"""Adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``): the key
layout, saving and reading the files (loading them onto a model: ``adapter_load``).

Key layout (peft 0.21, what ``PeftModel.save_pretrained`` writes and ``from_pretrained`` reads):

* LoRA: ``base_model.model.<module>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r);
* embeddings/lm_head trained in full (``modules_to_save``): ``base_model.model.<module>.weight``;
* new rows (``trainable_token_indices``): ``base_model.model.<module>.token_adapter.
  trainable_tokens_delta`` (n, H); despite the name these are the rows' values, not deltas.
  With tied weights only the embedding's entry is written and PEFT ties the lm_head to it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llamazh._atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from llamazh._files import load_safetensors, read_json
from llamazh.training.lora import LoRALinear
from llamazh.training.prepared import PreparedModel, prepared_of

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def _full(t: Tensor) -> Tensor:
    """A plain CPU tensor (gathers an FSDP2/DTensor shard: a collective on every rank)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


META_VOCAB = "llamazh.vocab_size"  # safetensors metadata: the vocabulary the adapter fits
META_TIED = "llamazh.tied"  # "true" when trained on a model whose lm_head is its embedding


def model_key(key: str) -> str:
    """The prepared model's ``state_dict`` key of a normalised adapter key (no prefix).

    Example:
        >>> model_key("model.embed_tokens.token_adapter.trainable_tokens_delta")
        'model.embed_tokens.rows'
    """
    return key.removesuffix(ROWS_SUFFIX) + ".rows" if key.endswith(ROWS_SUFFIX) else key


def _entries(prepared: PreparedModel) -> dict[str, Tensor]:
    """Normalised adapter key -> live tensor; a tied lm_head is left out (it is the embedding)."""
    model, cfg = prepared.model, prepared.config
    out: dict[str, Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{name}.lora_A.weight"] = m.lora_A.weight
            out[f"{name}.lora_B.weight"] = m.lora_B.weight
    for name, mode in ((prepared.embed_name, cfg.embeddings), (prepared.head_name, cfg.lm_head)):
        if prepared.tied and name == prepared.head_name:
            continue
        module = model.get_submodule(name)
        if mode == "full":
            out[f"{name}.weight"] = module.weight
        elif mode == "new_rows":
            out[f"{name}{ROWS_SUFFIX}"] = module.rows
    return out


def _check_gathered(key: str, t: Tensor) -> None:
    numel = getattr(t, "ds_numel", None)  # a DeepSpeed ZeRO-3 partitioned parameter
    if numel is not None and t.numel() != numel:
        raise ValueError(
            f"{key} is partitioned by DeepSpeed ZeRO-3 ({t.numel()} of {numel} elements here); "
            "save through Trainer with zero_optimization.stage3_gather_16bit_weights_on_model_save"
            "=true, or call save_adapter inside deepspeed.zero.GatheredParameters"
        )


def adapter_state_dict(
    prepared: PreparedModel, state_dict: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's keys (see the module docstring), on the CPU.

    Args:
        prepared: the prepared model.
        state_dict: optional full ``state_dict`` of the prepared model (what Trainer hands to
            ``save_pretrained``, gathered under DeepSpeed ZeRO-3); read instead of the live
            parameters when given.

    Raises:
        ValueError: a tensor is missing from ``state_dict`` or is a ZeRO-3 partition.
    """
    if state_dict is not None and not state_dict:  # what Trainer hands over when it cannot gather
        raise ValueError(
            "save_pretrained got an empty state_dict: under DeepSpeed ZeRO-3 Trainer gathers the "
            "weights only with zero_optimization.stage3_gather_16bit_weights_on_model_save=true; "
            "set it (examples/deepspeed/zero3.json)"
        )
    out: dict[str, Tensor] = {}
    for key, live in _entries(prepared).items():
        if state_dict is not None:
            t = state_dict.get(model_key(key))
            if t is None:
                raise ValueError(
                    f"state_dict has no {model_key(key)!r}; pass the prepared model's own "
                    "state_dict (or none)"
                )
        else:
            t = live
        _check_gathered(key, t)
        out[f"{PREFIX}{key}"] = _full(t).clone()
    cfg = prepared.config
    if prepared.tied and cfg.lm_head == "full":  # PEFT's modules_to_save writes both names
        embed = out[f"{PREFIX}{prepared.embed_name}.weight"]
        out[f"{PREFIX}{prepared.head_name}.weight"] = embed.clone()  # safetensors: no sharing
    return out


def adapter_metadata(prepared: PreparedModel) -> dict[str, str]:
    """safetensors metadata: the vocabulary size and whether the model was tied."""
    vocab = prepared.model.get_input_embeddings().weight.shape[0]
    return {"format": "pt", META_VOCAB: str(vocab), META_TIED: str(prepared.tied).lower()}


def write_adapter_files(
    directory: Path, prepared: PreparedModel, tensors: dict[str, Tensor]
) -> None:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` into ``directory``, each
    through a temporary file (a crash leaves no half-written file under either name)."""
    from safetensors.torch import save

    embed_short = prepared.embed_name.rpartition(".")[2]
    head_short = prepared.head_name.rpartition(".")[2]
    config = prepared.config.to_peft(
        embed_name=embed_short, head_name=head_short, tied=prepared.tied
    )
    data = save(tensors, metadata=adapter_metadata(prepared))
    atomic_write_bytes(directory / WEIGHTS_NAME, data)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_adapter(
    model: nn.Module | PreparedModel,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write a prepared model's adapter as a PEFT adapter directory, atomically.

    ``peft.PeftModel.from_pretrained(base, out_dir)`` on the stock base model (resized to the
    same vocabulary) reproduces this model's logits. Under ``torch.distributed`` call it on
    every rank: sharded tensors are gathered and rank 0 writes.

    Args:
        model: a :class:`PreparedModel` or a model passed through :func:`prepare_for_training`.
        out_dir: the adapter directory to create.
        overwrite: replace an existing ``out_dir``.
        tokenizer: optional; its ``save_pretrained`` is called into the directory (the merged
            model takes its tokenizer from the last adapter that carries one).

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: the model was not prepared. FileExistsError: ``out_dir`` exists.

    Example:
        >>> save_adapter(prepared, "runs/zh-lora", tokenizer=tokenizer)
    """
    prepared = prepared_of(model)
    if prepared is None:
        raise ValueError("model was not prepared with prepare_for_training or load_adapter")
    out = Path(out_dir)
    if out.exists() and not overwrite:  # fail before any collective work
        raise FileExistsError(f"{str(out)!r} already exists; pass overwrite=True to replace it")
    tensors = adapter_state_dict(prepared)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return out
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_adapter_files(tmp, prepared, tensors)
        if tokenizer is not None:
            from llamazh.tokenizer.export import save_tokenizer  # keeps BOS (see there)

            save_tokenizer(tokenizer, tmp)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out


def read_adapter(
    path: str | os.PathLike[str], *, allow_pickle: bool = False
) -> tuple[dict, dict[str, Tensor]]:
    """Read ``(adapter_config dict, tensors)`` from an adapter directory, keys normalised to
    ``<module>.lora_A.weight`` / ``<module>.weight`` / ``<module>.token_adapter...`` (no prefix).

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or no weights file.
        ValueError: only a pickled ``adapter_model.bin`` exists and ``allow_pickle`` is false.
    """
    root = Path(path)
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(root)!r} is not an adapter directory: no {CONFIG_NAME}")
    config = read_json(cfg_path, "a PEFT adapter config")
    if (root / WEIGHTS_NAME).is_file():
        raw = load_safetensors(root / WEIGHTS_NAME)
    elif (root / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise ValueError(
                f"{str(root / PICKLE_NAME)!r} is a pickled adapter; it is not loaded unless you "
                "pass allow_pickle=True (then torch.load(weights_only=True) reads tensors only)"
            )
        raw = torch.load(root / PICKLE_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{str(root)!r} has neither {WEIGHTS_NAME} nor {PICKLE_NAME}")
    tensors = {}
    for key, value in raw.items():
        key = key.removeprefix(PREFIX)
        key = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", key)  # adapter name
        key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
        key = key.replace(".original_module.", ".")
        tensors[key] = value
    return config, tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The safetensors metadata of an adapter directory's weights ({} for a pickled one)."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return dict(f.metadata() or {})


def check_fits(
    path: str | os.PathLike[str], metadata: dict[str, str], *, vocab: int, tied: bool
) -> None:
    """Refuse an adapter whose recorded vocabulary or tying differs from the model's.

    Raises:
        ValueError: naming what the adapter was trained on, what the model is, and the fix.
    """
    if META_VOCAB in metadata and int(metadata[META_VOCAB]) != vocab:
        raise ValueError(
            f"adapter {str(path)!r} was trained with vocabulary {metadata[META_VOCAB]} "
            f"but the model has {vocab}; resize the model to the adapter's tokenizer "
            "first (llamazh.tokenizer.resize_embeddings, len(tokenizer) rows)"
        )
    if META_TIED in metadata and (metadata[META_TIED] == "true") != tied:
        trained, model = ("tied", "untied") if metadata[META_TIED] == "true" else ("untied", "tied")
        raise ValueError(
            f"adapter {str(path)!r} was trained on a model with {trained} embeddings but the "
            f"model's are {model}; load it into a base with tie_word_embeddings="
            f"{metadata[META_TIED] == 'true'} (the one it was trained on)"
        )
