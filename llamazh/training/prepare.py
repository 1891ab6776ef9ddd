"""``prepare_for_training``: freeze a causal LM, add LoRA, choose how embeddings and lm_head train.

Works on any model that exposes ``get_input_embeddings()``/``get_output_embeddings()`` and
``nn.Linear`` projections (every transformers causal LM); knows no transformers class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llamazh.patching import Change
from llamazh.training.config import DEFAULT_TARGETS, AdapterConfig, as_id_tuple
from llamazh.training.embeddings import RowsEmbedding, RowsLinear, _NewRows
from llamazh.training.lora import LoRALinear

ATTR = "_llamazh_prepared"  # the PreparedModel is remembered on the model instance


@dataclass(frozen=True)
class TrainableReport:
    """Trainable parameters by kind (``lora``, ``embeddings``, ``lm_head``) and in total.

    ``str(report)`` is a small table; ``optimizer_state_bytes`` assumes Adam(W) (two fp32-sized
    moments per trainable element, in the parameters' dtype).
    """

    by_kind: dict[str, int]
    bytes_by_kind: dict[str, int]
    total_params: int

    @property
    def trainable(self) -> int:
        return sum(self.by_kind.values())

    @property
    def optimizer_state_bytes(self) -> int:
        return 2 * sum(self.bytes_by_kind.values())

    def __str__(self) -> str:
        lines = [f"{'kind':<12}{'trainable':>14}{'% of model':>12}"]
        for kind, n in self.by_kind.items():
            lines.append(f"{kind:<12}{n:>14,}{100 * n / self.total_params:>11.2f}%")
        lines.append(
            f"{'total':<12}{self.trainable:>14,}{100 * self.trainable / self.total_params:>11.2f}%"
        )
        lines.append(f"model parameters: {self.total_params:,}")
        return "\n".join(lines)


@dataclass
class PreparedModel:
    """The result of :func:`prepare_for_training`: the (modified in place) model and what changed.

    Attributes:
        model: the same model object, now with LoRA wrappers and frozen base weights.
        config: the :class:`AdapterConfig` (what :func:`save_adapter` writes).
        embed_name, head_name: full module names of the input embedding and the lm_head.
        tied: whether the lm_head shares the embedding weight.
        changes: reversible changes; :meth:`undo` restores the original model.
    """

    model: nn.Module
    config: AdapterConfig
    embed_name: str
    head_name: str
    tied: bool
    changes: list[Change] = field(default_factory=list, repr=False)

    def lora_modules(self) -> dict[str, LoRALinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoRALinear)}

    def named_trainable(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by kind, each parameter once (tied ones under embeddings)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "lora": [],
            "embeddings": [],
            "lm_head": [],
        }
        seen: set[int] = set()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if ".lora_A." in name or ".lora_B." in name:
                groups["lora"].append((name, p))
            elif name.startswith(self.embed_name + "."):
                groups["embeddings"].append((name, p))
            elif name.startswith(self.head_name + "."):
                groups["lm_head"].append((name, p))
            else:
                groups.setdefault("other", []).append((name, p))
        return groups

    def report(self) -> TrainableReport:
        """Counts of trainable parameters by kind (see :class:`TrainableReport`)."""
        groups = self.named_trainable()
        total = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        return TrainableReport(
            by_kind={k: sum(p.numel() for _, p in v) for k, v in groups.items()},
            bytes_by_kind={
                k: sum(p.numel() * p.element_size() for _, p in v) for k, v in groups.items()
            },
            total_params=total,
        )

    def param_groups(
        self,
        lr: float,
        *,
        weight_decay: float = 0.0,
        embedding_lr: float | None = None,
        embedding_weight_decay: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups: LoRA at ``lr``/``weight_decay``; embeddings and lm_head
        at ``embedding_lr`` (default ``lr``) and ``embedding_weight_decay`` (default 0: decaying
        the new rows toward zero fights their initialisation). Empty groups are left out; each
        group carries a ``"name"`` key.

        Example:
            >>> opt = torch.optim.AdamW(prepared.param_groups(2e-4, embedding_lr=1e-4))
        """
        emb_lr = lr if embedding_lr is None else embedding_lr
        groups = self.named_trainable()
        out = [
            {
                "name": "lora",
                "params": [p for _, p in groups["lora"]],
                "lr": lr,
                "weight_decay": weight_decay,
            }
        ]
        emb = [p for k in ("embeddings", "lm_head") for _, p in groups[k]]
        out.append(
            {
                "name": "embeddings",
                "params": emb,
                "lr": emb_lr,
                "weight_decay": embedding_weight_decay,
            }
        )
        if groups.get("other"):
            out.append(
                {
                    "name": "other",
                    "params": [p for _, p in groups["other"]],
                    "lr": lr,
                    "weight_decay": weight_decay,
                }
            )
        return [g for g in out if g["params"]]

    def undo(self) -> None:
        """Restore the original modules and ``requires_grad`` flags (LoRA and new rows dropped)."""
        for change in reversed(self.changes):
            change.undo()
        self.changes.clear()
        if ATTR in self.model.__dict__:
            del self.model.__dict__[ATTR]


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


def prepared_of(model: nn.Module) -> PreparedModel | None:
    """The :class:`PreparedModel` of a model given to :func:`prepare_for_training`, or None."""
    if isinstance(model, PreparedModel):
        return model
    return model.__dict__.get(ATTR)


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


def new_rows_modules(model: nn.Module) -> dict[str, _NewRows]:
    """The new-row wrappers of a prepared model by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _NewRows)}
