"""``prepare_for_training``: freeze a causal LM, add LoRA, choose how embeddings and lm_head train.

Works on any model that exposes ``get_input_embeddings()``/``get_output_embeddings()`` and
``nn.Linear`` projections (every transformers causal LM); knows no transformers class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from llamazh.patching import Change
from llamazh.training.config import DEFAULT_TARGETS, AdapterConfig, as_id_tuple
from llamazh.training.embeddings import RowsEmbedding, RowsLinear
from llamazh.training.lora import LoRALinear
from llamazh.training.prepared import ATTR, PreparedModel, TrainableReport, prepared_of

__all__ = [
    "PreparedModel",
    "TrainableReport",
    "prepare_for_training",
    "prepared_of",
    "resolve_modes",
]


def _set_child(root: nn.Module, name: str, new: nn.Module, changes: list[Change]) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    new.train(old.training)  # a new wrapper follows the mode of the layer it wraps
    setattr(parent, child, new)
    changes.append(
        Change(
            f"{name}: {type(old).__name__} -> {type(new).__name__}",
            lambda: setattr(parent, child, old),
        )
    )


def match_targets(targets: Sequence[str] | str, name: str) -> bool:
    """PEFT's rule: a regex string must fullmatch the module name; a name list matches suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _module_name(model: nn.Module, module: nn.Module | None, what: str) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError(f"the model's {what} is not one of its submodules")


def resolve_modes(embeddings: str | None, lm_head: str | None, *, tied: bool) -> tuple[str, str]:
    """The (embeddings, lm_head) modes to use: None means ``"full"``; on a tied model a mode
    named for one of the two applies to both, and two different named modes raise.

    Example:
        >>> resolve_modes("new_rows", None, tied=True)
        ('new_rows', 'new_rows')
    """
    if tied:
        if embeddings is not None and lm_head is not None and embeddings != lm_head:
            raise ValueError(
                "the model ties lm_head to the input embedding (one matrix), so embeddings and "
                f"lm_head cannot differ; got embeddings={embeddings!r}, lm_head={lm_head!r}. "
                "Name one of them: the other follows"
            )
        mode = embeddings if embeddings is not None else lm_head
        mode = "full" if mode is None else mode
        return mode, mode
    return (
        "full" if embeddings is None else embeddings,
        "full" if lm_head is None else lm_head,
    )


def prepare_for_training(
    model: nn.Module,
    *,
    rank: int = 64,
    alpha: float = 128.0,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str = DEFAULT_TARGETS,
    embeddings: str | None = None,
    lm_head: str | None = None,
    new_token_ids: torch.Tensor | Sequence[int] | None = None,
    rslora: bool = False,
    adapter_dtype: torch.dtype | None = torch.float32,
    gradient_checkpointing: bool = False,
    base_model_name_or_path: str | None = None,
) -> PreparedModel:
    """Freeze ``model``, wrap the target projections with LoRA and set up embeddings and lm_head.

    Defaults are the Chinese-LLaMA-Alpaca recipe (r=64, alpha=128, dropout 0.05 on the seven
    projections; embeddings and lm_head trained in full). The model is modified in place; its
    ``save_pretrained`` then writes the adapter (PEFT format), so ``Trainer``/TRL checkpoints
    are adapters that ``resume_from_checkpoint`` reads (see :mod:`llamazh.training.checkpoint`).

    Args:
        model: a causal LM with ``get_input_embeddings()``/``get_output_embeddings()``.
        rank, alpha, dropout, rslora: LoRA hyper-parameters (update = ``B @ A * alpha / r``).
        target_modules: module-name suffixes or one regex (PEFT's forms); must match at least one
            ``nn.Linear`` and may not match the lm_head.
        embeddings, lm_head: ``"frozen"``, ``"full"`` or ``"new_rows"`` (only the rows of
            ``new_token_ids`` train; gradients and optimizer state exist only for them); None
            (the default) means ``"full"``. With tied weights (one matrix, e.g. SmolLM2) naming
            one is enough: the other follows, and ``"new_rows"`` trains the new rows of the one
            shared matrix; naming both with different modes raises.
        new_token_ids: int64 (n,) ids of the added tokens (``llamazh.tokenizer.resize_embeddings``
            returns them); required by ``"new_rows"``.
        adapter_dtype: dtype of the LoRA factors and new rows (fp32 by default; None = the base's).
        gradient_checkpointing: enable transformers' activation checkpointing (non-reentrant).
            ``config.use_cache`` is set to False in any case (undone by ``undo()``).
        base_model_name_or_path: recorded in the saved ``adapter_config.json``.

    Returns:
        A :class:`PreparedModel` (``.model``, ``.report()``, ``.param_groups(lr)``, ``.undo()``).

    Raises:
        ValueError: targets match nothing or the lm_head, ``new_rows`` without ids, ids out of
            range or repeated, tied weights with different modes, an already prepared model, a
            PEFT model (``get_peft_model``'s result: pass the plain model instead).
        TypeError: ids that are not integers.

    Example:
        >>> prepared = prepare_for_training(model, embeddings="new_rows", lm_head="new_rows",
        ...                                 new_token_ids=new_ids)
        >>> # a tied model (SmolLM2): the lm_head follows the embedding
        >>> prepared = prepare_for_training(tied_model, embeddings="new_rows", new_token_ids=ids)
        >>> print(prepared.report())
        >>> opt = torch.optim.AdamW(prepared.param_groups(2e-4))
    """
    if prepared_of(model) is not None or any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers (prepared twice?); call .undo() first")
    _refuse_peft(model)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear):
        raise TypeError(
            "model must have an nn.Embedding input embedding and an nn.Linear lm_head, got "
            f"{type(embed).__name__} and {type(head).__name__}"
        )
    tied = head.weight is embed.weight
    embeddings, lm_head = resolve_modes(embeddings, lm_head, tied=tied)
    vocab = embed.weight.shape[0]
    if head.weight.shape[0] != vocab:
        raise ValueError(f"lm_head has {head.weight.shape[0]} rows but the embedding has {vocab}")
    ids = as_id_tuple("new_token_ids", new_token_ids, vocab)
    config = AdapterConfig(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        embeddings=embeddings,
        lm_head=lm_head,
        new_token_ids=ids,
        rslora=rslora,
        base_model_name_or_path=base_model_name_or_path,
    )
    embed_name = _module_name(model, embed, "input embedding")
    head_name = _module_name(model, head, "output embedding (lm_head)")
    targets = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n and match_targets(config.target_modules, n)
    ]
    if head_name in targets:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches the lm_head {head_name!r}; "
            "train it with lm_head='full' or 'new_rows' instead"
        )
    if not targets:
        linear = sorted(
            {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no nn.Linear in the model; "
            f"its linear layers are named {linear}"
        )

    prepared = PreparedModel(model, config, embed_name, head_name, tied)
    changes = prepared.changes
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    changes.append(
        Change("base parameters frozen", lambda: [p.requires_grad_(f) for p, f in flags.values()])
    )
    try:
        model.requires_grad_(False)
        for name in targets:
            base = model.get_submodule(name)
            lora = LoRALinear(
                base, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, dtype=adapter_dtype
            )
            _set_child(model, name, lora, changes)
        id_tensor = torch.tensor(ids, dtype=torch.long)
        rows = None
        if embeddings == "full":
            embed.weight.requires_grad_(True)
        elif embeddings == "new_rows":
            wrapper = RowsEmbedding(embed, id_tensor, dtype=adapter_dtype)
            _set_child(model, embed_name, wrapper, changes)
            rows = wrapper.rows if tied else None
        if lm_head == "full":
            head.weight.requires_grad_(True)
        elif lm_head == "new_rows":
            _set_child(
                model,
                head_name,
                RowsLinear(head, id_tensor, rows=rows, dtype=adapter_dtype),
                changes,
            )
        if gradient_checkpointing:
            _enable_checkpointing(model, changes)
        _disable_kv_cache(model, changes)
        from llamazh.training.checkpoint import install  # it imports this module

        install(prepared)
    except BaseException:
        prepared.undo()
        raise
    model.__dict__[ATTR] = prepared
    return prepared


def _refuse_peft(model: nn.Module) -> None:
    """A PEFT model (or one with PEFT layers injected) would get LoRA on LoRA and adapter keys
    no loader reads; say what to do instead."""
    peft = [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")]
    if peft or hasattr(model, "peft_config"):
        raise ValueError(
            f"model is already a PEFT model ({type(model).__name__} with {sorted(set(peft))[:3]}); "
            "prepare_for_training adds its own LoRA to a plain transformers model. Either pass "
            "the plain base model (model.unload() or model.get_base_model() of a fresh "
            "get_peft_model), or train the PEFT model as it is: its save_pretrained writes an "
            "adapter that llamazh's load_adapter and merge_adapters read"
        )


def _disable_kv_cache(model: nn.Module, changes: list[Change]) -> None:
    """Training needs no KV cache, and with one transformers ignores packed position_ids."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False
        changes.append(
            Change("config.use_cache: True -> False", lambda: setattr(config, "use_cache", True))
        )


def _enable_checkpointing(model: nn.Module, changes: list[Change]) -> None:
    """Non-reentrant activation checkpointing (frozen embeddings need no input grads then)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        undo = model.activation_checkpointing_disable
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        undo = model.gradient_checkpointing_disable
    else:
        raise TypeError("gradient_checkpointing=True needs a transformers model")
    changes.append(Change("activation checkpointing enabled", undo))
