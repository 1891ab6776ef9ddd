"""A prepared model saves itself as an adapter: what ``Trainer``, TRL and users' own
``model.save_pretrained(dir)`` write is a PEFT adapter directory, and ``Trainer``'s
``resume_from_checkpoint`` reads it back.

Why on the model instance: every trainer ends its checkpoint in
``unwrap_model(model).save_pretrained(dir, state_dict=..., is_main_process=...)`` (Trainer,
TRL, accelerate's ``save_model``), handing over the state dict it gathered (DeepSpeed ZeRO-3).
Replacing that one method on the prepared model (undone by ``prepared.undo()``) makes every one
of them write an adapter, with no trainer subclass or callback to remember.

A checkpoint directory holds, each written through a temporary file:

* ``adapter_model.safetensors`` and ``adapter_config.json`` (PEFT's format, see
  :mod:`llamazh.training.adapters`): ``PeftModel.from_pretrained``, :func:`load_adapter` and
  :func:`merge_adapters` take it;
* ``model.safetensors.index.json``, written last: it lists the trainable tensors' keys in this
  model's ``state_dict`` and points them at the adapter file. ``Trainer`` resumes a non-PEFT
  model through such an index (``load_sharded_checkpoint``, ``strict=False``); a load-state-dict
  pre-hook on the model maps PEFT's keys back to its own. A save interrupted before the index
  is written is refused by ``resume_from_checkpoint`` ("Can't find a checkpoint index").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from llamazh._atomic import atomic_write_text
from llamazh._change import Change
from llamazh.training.adapters import (
    PREFIX,
    WEIGHTS_NAME,
    adapter_state_dict,
    model_key,
    write_adapter_files,
)
from llamazh.training.merge import INDEX_NAME
from llamazh.training.prepared import PreparedModel


def save_checkpoint(
    prepared: PreparedModel,
    save_directory: str | os.PathLike[str],
    *,
    state_dict: dict[str, Tensor] | None = None,
    is_main_process: bool = True,
) -> Path:
    """Write the adapter of ``prepared`` into ``save_directory`` (created if needed), plus the
    resume index (see the module docstring). Existing other files are left alone.

    Args:
        prepared: the prepared model.
        save_directory: the checkpoint or output directory.
        state_dict: the model's full state dict when the caller gathered one (Trainer under
            DeepSpeed ZeRO-3); otherwise the live parameters are read (FSDP2 DTensors gathered,
            which is a collective: call on every rank).
        is_main_process: only the main process writes.

    Returns:
        ``Path(save_directory)``.

    Example:
        >>> save_checkpoint(prepared, "out/checkpoint-100")
    """
    tensors = adapter_state_dict(prepared, state_dict)
    out = Path(save_directory)
    if not is_main_process:
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_adapter_files(out, prepared, tensors)
    keys = {model_key(k.removeprefix(PREFIX)) for k in tensors}
    own = {k for k, _ in prepared.model.named_parameters(remove_duplicate=False)}
    index = {
        "metadata": {"llamazh": "trainable tensors only, under PEFT keys in the adapter file"},
        "weight_map": {k: WEIGHTS_NAME for k in sorted(keys & own)},
    }
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return out


def _peft_keys_to_own(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: rename PEFT adapter keys to this model's keys, in place."""
    if prefix:
        return
    for key in [k for k in state_dict if k.startswith(PREFIX)]:
        state_dict[model_key(key.removeprefix(PREFIX))] = state_dict.pop(key)


def install(prepared: PreparedModel) -> None:
    """Make ``prepared.model.save_pretrained`` write adapters and its ``load_state_dict`` read
    them (PEFT keys); both undone by ``prepared.undo()``. Models without ``save_pretrained``
    (plain ``nn.Module``) get only the load hook."""
    model = prepared.model
    if hasattr(model, "save_pretrained"):

        def save_pretrained(
            save_directory: str | os.PathLike[str],
            is_main_process: bool = True,
            state_dict: dict[str, Tensor] | None = None,
            push_to_hub: bool = False,
            **kwargs: Any,
        ) -> None:
            """Write this prepared model's adapter (PEFT format), not the whole model."""
            if push_to_hub:
                raise ValueError(
                    "push_to_hub=True is not supported for a prepared model; save the adapter "
                    "and upload the directory"
                )
            save_checkpoint(
                prepared, save_directory, state_dict=state_dict, is_main_process=is_main_process
            )

        model.save_pretrained = save_pretrained
        prepared.changes.append(
            Change("save_pretrained writes the adapter", lambda: delattr(model, "save_pretrained"))
        )
    handle = model.register_load_state_dict_pre_hook(_peft_keys_to_own)
    prepared.changes.append(Change("load_state_dict reads PEFT adapter keys", handle.remove))
