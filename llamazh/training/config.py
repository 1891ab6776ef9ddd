"""What an adapter is: a frozen dataclass, with strict conversion to and from PEFT's
``adapter_config.json`` (``LoraConfig`` fields, peft 0.21)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llamazh._checks import check_choice, check_positive_float, check_positive_int

MODES = ("frozen", "full", "new_rows")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# PEFT LoraConfig fields whose default we reproduce exactly; any other value changes the math.
_PEFT_NEUTRAL: dict[str, Any] = {
    "bias": "none",
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "target_parameters": None,
    "exclude_modules": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
}
# fields that only matter to PEFT's own bookkeeping or initialisation
_PEFT_IGNORED = {
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "peft_version",
    "qalora_group_size",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "ensure_weight_tying",
    "modules_to_tie",
}


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA plus the treatment of the embeddings and lm_head.

    Attributes:
        rank, alpha, dropout: LoRA r, alpha (update scaled by ``alpha / r``) and dropout.
        target_modules: module-name suffixes (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``) or one regular expression matched against the
            full name (PEFT's two forms).
        embeddings, lm_head: ``"frozen"``, ``"full"`` or ``"new_rows"``.
        new_token_ids: ids whose rows are trainable in ``"new_rows"`` mode (sorted, distinct).
        rslora: scale by ``alpha / sqrt(r)``.
        base_model_name_or_path: recorded in ``adapter_config.json``.
    """

    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    embeddings: str = "full"
    lm_head: str = "full"
    new_token_ids: tuple[int, ...] = ()
    rslora: bool = False
    base_model_name_or_path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank)
        check_positive_float("alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got dropout={self.dropout!r}")
        check_choice("embeddings", self.embeddings, MODES)
        check_choice("lm_head", self.lm_head, MODES)
        targets = self.target_modules
        if not isinstance(targets, str):
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    "target_modules must be a non-empty sequence of module names or one regex "
                    f"string, got target_modules={self.target_modules!r}"
                )
            object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "new_token_ids", tuple(int(i) for i in self.new_token_ids))
        uses_rows = "new_rows" in (self.embeddings, self.lm_head)
        if uses_rows and not self.new_token_ids:
            raise ValueError(
                f"embeddings={self.embeddings!r}, lm_head={self.lm_head!r} train only new rows, "
                "but new_token_ids is empty; pass the ids returned by "
                "llamazh.tokenizer.resize_embeddings (or use 'full')"
            )

    @property
    def scaling(self) -> float:
        from llamazh.training.lora import lora_scaling

        return lora_scaling(self.rank, self.alpha, rslora=self.rslora)

    def to_peft(self, *, embed_name: str, head_name: str, tied: bool) -> dict[str, Any]:
        """The ``adapter_config.json`` dict PEFT's ``LoraConfig`` reads.

        ``embed_name``/``head_name`` are the last components of the embedding and lm_head module
        names (``"embed_tokens"``, ``"lm_head"``). Full modes become ``modules_to_save``; new-row
        modes become ``trainable_token_indices`` (a list when the weights are tied, which PEFT
        applies to both).
        """
        modules_to_save = []
        trainable: dict[str, list[int]] = {}
        for name, mode in ((embed_name, self.embeddings), (head_name, self.lm_head)):
            if mode == "full":
                modules_to_save.append(name)
            elif mode == "new_rows":
                trainable[name] = list(self.new_token_ids)
        token_indices: Any = trainable or None
        if tied and trainable:
            token_indices = list(self.new_token_ids)
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "target_modules": targets if isinstance(targets, str) else list(targets),
            "modules_to_save": modules_to_save or None,
            "trainable_token_indices": token_indices,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
            "init_lora_weights": True,
            **_PEFT_NEUTRAL,
        }

    @classmethod
    def from_peft(
        cls, cfg: dict[str, Any], *, embed_name: str, head_name: str, tied: bool = False
    ) -> AdapterConfig:
        """Read a PEFT ``adapter_config.json`` dict; raise on anything we cannot reproduce.

        ``tied``: the base ties lm_head to the embedding. PEFT then trains the lm_head through
        the embedding's ``trainable_token_indices`` (list or ``{embed_name: ids}``) and so do
        we; on an untied base a list names the embedding only (PEFT's rule).
        """
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(
                f"only LoRA adapters are supported, got peft_type={cfg['peft_type']!r}"
            )
        unsupported = [
            f"{k}={cfg[k]!r}"
            for k, neutral in _PEFT_NEUTRAL.items()
            if k in cfg and cfg[k] != neutral and not (cfg[k] in (None, [], {}) and not neutral)
        ]
        unsupported += [f"{k}={cfg[k]!r}" for k in ("rank_pattern", "alpha_pattern") if cfg.get(k)]
        known = {
            *_PEFT_NEUTRAL,
            *_PEFT_IGNORED,
            "peft_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "target_modules",
            "modules_to_save",
            "trainable_token_indices",
            "rank_pattern",
            "alpha_pattern",
        }
        unsupported += [
            f"{k}={v!r}"
            for k, v in cfg.items()
            if k not in known and v not in (None, False, {}, [])
        ]
        if unsupported:
            raise ValueError(
                f"adapter_config.json uses PEFT features llamazh does not support: "
                f"{', '.join(unsupported)}"
            )
        targets = cfg.get("target_modules")
        if targets is None:
            raise ValueError("adapter_config.json has no target_modules")
        modes = {embed_name: "frozen", head_name: "frozen"}
        for name in cfg.get("modules_to_save") or []:
            if name not in modes:
                raise ValueError(
                    f"modules_to_save={cfg['modules_to_save']!r}: only {embed_name!r} and "
                    f"{head_name!r} are supported"
                )
            modes[name] = "full"
        indices = cfg.get("trainable_token_indices")
        ids: list[int] = []
        if isinstance(indices, list):
            indices = {embed_name: indices}
        if tied and embed_name in (indices or {}) and modes[head_name] == "frozen":
            indices = {**indices, head_name: indices[embed_name]}
        for name, idx in (indices or {}).items():
            if name not in modes:
                raise ValueError(f"trainable_token_indices has unsupported module {name!r}")
            if ids and sorted(idx) != sorted(ids):
                raise ValueError(
                    "trainable_token_indices with different ids per module is not supported"
                )
            ids, modes[name] = list(idx), "new_rows"
        return cls(
            rank=int(cfg["r"]),
            alpha=float(cfg["lora_alpha"]),
            dropout=float(cfg.get("lora_dropout") or 0.0),
            target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
            embeddings=modes[embed_name],
            lm_head=modes[head_name],
            new_token_ids=tuple(ids),
            rslora=bool(cfg.get("use_rslora", False)),
            base_model_name_or_path=cfg.get("base_model_name_or_path"),
        )


def as_id_tuple(name: str, ids: Any, vocab_size: int) -> tuple[int, ...]:
    """Validate token ids: 1-D ints, distinct, each in [0, vocab_size)."""
    import torch

    if ids is None:
        return ()
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a 1-D integer tensor, got dtype={ids.dtype}, "
                f"shape={tuple(ids.shape)}"
            )
        ids = ids.tolist()
    if not isinstance(ids, Sequence) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise TypeError(
            f"{name} must be a sequence of ints or a 1-D integer tensor, got {ids!r:.80}"
        )
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"{name} must be in [0, {vocab_size}) (the model's vocabulary), got {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} must be distinct, got {len(ids) - len(set(ids))} duplicates")
    return tuple(ids)
