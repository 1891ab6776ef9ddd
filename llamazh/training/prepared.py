"""What :func:`llamazh.training.prepare_for_training` returns: the :class:`PreparedModel` (the
model, its adapter config, the reversible changes) and its :class:`TrainableReport`; and how
a prepared model is found again from the model object (:func:`prepared_of`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from llamazh.patching import Change
from llamazh.training.config import AdapterConfig
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


def prepared_of(model: nn.Module) -> PreparedModel | None:
    """The :class:`PreparedModel` of a model given to :func:`prepare_for_training`, or None."""
    if isinstance(model, PreparedModel):
        return model
    return model.__dict__.get(ATTR)
