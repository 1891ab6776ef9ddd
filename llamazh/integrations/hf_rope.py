"""Make a loaded transformers model use a :mod:`llamazh.rope` strategy (``llamazh.patch(model,
rope=...)``), save it so that stock transformers reloads it, and load what only llamazh can.

What :func:`patch_rope` changes, all on the model instance and all undoable:

* ``config.rope_parameters`` becomes ``{rope_theta, [partial_rotary_factor], **strategy.to_hf()}``
  (and, for transformers' dynamic NTK, ``max_position_embeddings`` becomes the strategy's
  original length, since that is where transformers reads it). ``save_pretrained`` then writes
  a config that stock ``from_pretrained`` turns into the same model for linear, dynamic, yarn
  and llama3; llamazh-only strategies are written as ``rope_type="llamazh_*"`` with
  ``"requires": "llamazh"`` (stock transformers refuses them) and load with
  :func:`from_pretrained`.
* every rotary embedding following ``LlamaRotaryEmbedding``'s contract (``inv_freq``,
  ``original_inv_freq``, ``attention_scaling``, ``rope_type``, ``max_seq_len_cached``) gets the
  strategy's frequencies; its own ``forward`` keeps running for types transformers knows (so the
  result is bit-identical to a natively built model), a llamazh forward replaces it on the
  instance for the others.
* attention modules of the Llama, Mistral and Qwen2 families get a llamazh ``forward`` on the
  instance that applies :func:`llamazh.rope.apply_rotary` (fused Triton kernel on CUDA, the
  PyTorch reference on CPU, chosen at call time) and then calls whatever
  ``config._attn_implementation`` names in transformers' ``ALL_ATTENTION_FUNCTIONS``.

``consistent_cache=True`` (dynamic strategies): the KV cache stores keys *unrotated* and all of
them are rotated with the current frequencies at every step, so queries and cached keys always
share one frequency set (transformers' dynamic NTK rotates each cached key with the frequencies
of the length at which it was written). Deeper layers still see hidden states computed at
earlier lengths, which no KV cache can avoid.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch

from llamazh._change import Change
from llamazh.integrations.hf_compat import (
    attention_contract,
    check_rotary_forward,
    get_attention_function,
)
from llamazh.rope.apply import apply_rotary
from llamazh.rope.config import from_hf
from llamazh.rope.strategies import DynamicNTKScaling, RopeScaling
from llamazh.rope.tables import rope_cos_sin

__all__ = ["from_pretrained", "patch_rope", "strategy_of"]

_FUSED_FAMILIES = ("llama", "mistral", "qwen2")  # attention forwards with Llama's structure
_MISSING = object()


def strategy_of(config: Any) -> RopeScaling:
    """The strategy a transformers config describes (``config.rope_parameters``)."""
    return from_hf(_rope_parameters(config), max_position_embeddings=config.max_position_embeddings)


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if params is None:  # older configs: rope_theta + rope_scaling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    nested = getattr(config, "nested_rope_parameter_keys", None)
    if nested is not None and nested(params):
        raise ValueError(
            "per-layer-type rope_parameters (e.g. Gemma's sliding/full layers) are not supported; "
            f"got keys {sorted(params)}"
        )
    return dict(params)


def _set(obj: Any, name: str, value: Any, what: str, changes: list[Change]) -> None:
    """Set ``obj.name = value`` and record how to undo it (deleting what did not exist)."""
    if isinstance(obj, torch.nn.Module) and name in obj._buffers:
        old = obj._buffers[name]
    elif name in obj.__dict__ or hasattr(obj, name):
        old = getattr(obj, name)
    else:
        old = _MISSING
    if name == "forward" and "forward" not in obj.__dict__:
        old = _MISSING  # the class's forward: undo by removing the instance attribute

    def undo() -> None:
        if old is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, old)

    setattr(obj, name, value)
    changes.append(Change(what, undo))


def _is_rotary(module: torch.nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("inv_freq", "attention_scaling", "rope_type", "config"))


def patch_rope(
    model: Any,
    strategy: RopeScaling,
    *,
    consistent_cache: bool = False,
    fused: bool = True,
) -> list[Change]:
    """Make ``model`` use ``strategy``; return the changes (each undoable, newest last).

    Args:
        model: a transformers model with LlamaRotaryEmbedding-style rotary embedding(s).
        strategy: a :mod:`llamazh.rope` strategy; fields left ``None`` take the model's
            ``max_position_embeddings``.
        consistent_cache: keep cached keys unrotated and rotate them with the current
            frequencies every step (only meaningful for dynamic strategies; needs a fused
            attention family: Llama, Mistral, Qwen2).
        fused: route q/k rotation through :func:`llamazh.rope.apply_rotary` in the attention
            modules of those families (Triton on CUDA, PyTorch on CPU).

    Raises:
        TypeError: ``strategy`` is not a llamazh strategy.
        ValueError: no compatible rotary embedding, per-layer rope configs, or
            ``consistent_cache`` on an unsupported architecture.

    Example:
        >>> changes = patch_rope(model, YaRNScaling(factor=4.0, original_max_position=4096))
        >>> for change in reversed(changes): change.undo()
    """
    if not isinstance(strategy, RopeScaling):
        raise TypeError(f"rope must be a llamazh.rope strategy, got {strategy!r}")
    config = model.config
    params = _rope_parameters(config)
    strategy = strategy.with_defaults(config.max_position_embeddings)
    rotaries = [(n, m) for n, m in model.named_modules() if _is_rotary(m)]
    if not rotaries:
        raise ValueError(
            f"{type(model).__name__} has no rotary embedding with LlamaRotaryEmbedding's "
            "contract (inv_freq, attention_scaling, rope_type, config)"
        )
    attentions = [(n, m) for n, m in model.named_modules() if _fusable_attention(m)]
    if consistent_cache and (not attentions or len(rotaries) != 1):
        raise ValueError(
            "consistent_cache=True needs one rotary embedding and Llama/Mistral/Qwen2-style "
            f"attention modules; {type(model).__name__} has neither"
        )
    # Refuse unknown internals before changing anything (a misread forward drops the cache).
    native = strategy.hf_native and not consistent_cache
    if not native:
        for _, rotary in rotaries:
            check_rotary_forward(rotary)
    contracts = [attention_contract(m) for _, m in attentions] if fused or consistent_cache else []
    changes: list[Change] = []
    try:
        _patch(model, strategy, params, rotaries, attentions, contracts, consistent_cache, changes)
    except BaseException:
        for change in reversed(changes):  # leave the model as it was
            change.undo()
        raise
    return changes


def _patch(model, strategy, params, rotaries, attentions, contracts, consistent_cache, changes):
    """The body of :func:`patch_rope`; appends to ``changes`` as it goes (for the rollback)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    base = float(params.get("rope_theta", 10000.0))
    new_params = {k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params}
    new_params.update(strategy.to_hf())
    max_pos = config.max_position_embeddings
    if isinstance(strategy, DynamicNTKScaling) and strategy.original_max_position != max_pos:
        max_pos = strategy.original_max_position  # transformers' dynamic reads it from here
        _set(config, "max_position_embeddings", max_pos, "config.max_position_embeddings", changes)
    _set(config, "rope_parameters", new_params, f"config.rope_parameters = {new_params}", changes)

    native = strategy.hf_native and not consistent_cache
    inv_freq, scale = strategy.inv_freq(dim, base)
    for name, rotary in rotaries:
        prefix = f"{name}: " if name else ""
        if rotary.config is not config:
            _set(rotary.config, "rope_parameters", dict(new_params), f"{prefix}config", changes)
        device = rotary.inv_freq.device
        _set(rotary, "inv_freq", inv_freq.to(device), f"{prefix}inv_freq", changes)
        if hasattr(rotary, "original_inv_freq"):
            _set(rotary, "original_inv_freq", inv_freq.to(device), f"{prefix}original", changes)
        _set(rotary, "attention_scaling", scale, f"{prefix}attention_scaling = {scale}", changes)
        _set(rotary, "rope_type", new_params["rope_type"], f"{prefix}rope_type", changes)
        length = strategy.original_length or max_pos  # where dynamic strategies start to act
        for attr in ("max_seq_len_cached", "original_max_seq_len"):
            if hasattr(rotary, attr):
                _set(rotary, attr, length, f"{prefix}{attr} = {length}", changes)
        if not native:
            _set(rotary, "_llamazh_rope", (strategy, dim, base), f"{prefix}strategy", changes)
            forward = types.MethodType(_rotary_forward, rotary)
            _set(rotary, "forward", forward, f"{prefix}forward -> llamazh", changes)

    if contracts:  # fused rotary or consistent cache: llamazh's attention forward
        rotary = rotaries[0][1] if consistent_cache else None
        for (name, attention), contract in zip(attentions, contracts):
            _set(attention, "_llamazh_rotary", rotary, f"{name}: rotary", changes)
            what = f"{name}: cache contract {contract.releases}"
            _set(attention, "_llamazh_contract", contract, what, changes)
            forward = types.MethodType(_attention_forward, attention)
            _set(attention, "forward", forward, f"{name}.forward -> llamazh rotary", changes)


def _fusable_attention(module: torch.nn.Module) -> bool:
    family = type(module).__module__.rsplit(".", 2)
    return (
        len(family) == 3
        and family[1] in _FUSED_FAMILIES
        and type(module).__name__.endswith("Attention")
        and all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx"))
        and not any(hasattr(module, a) for a in ("q_norm", "k_norm"))
    )


@torch.no_grad()
def _rotary_forward(self: Any, x: torch.Tensor, position_ids: torch.Tensor):
    """LlamaRotaryEmbedding.forward for llamazh strategies: (cos, sin) (B, S, R) in x.dtype."""
    strategy, dim, base = self._llamazh_rope
    original = strategy.original_length
    if strategy.is_dynamic and original is not None:
        seq_len = int(position_ids.max()) + 1
        cached = self.max_seq_len_cached
        if seq_len > cached:  # grow-only, like transformers' dynamic_rope_update
            inv_freq, self.attention_scaling = strategy.inv_freq(
                dim, base, seq_len=seq_len, device=self.inv_freq.device
            )
            self.inv_freq = inv_freq
            self.max_seq_len_cached = seq_len
        if seq_len < original < cached:  # back to short sequences: original frequencies
            self.inv_freq = self.original_inv_freq.to(self.inv_freq.device)
            self.attention_scaling = strategy.inv_freq(dim, base)[1]
            self.max_seq_len_cached = original
    return rope_cos_sin(
        self.inv_freq, position_ids, attention_factor=self.attention_scaling, dtype=x.dtype
    )


def _attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
):
    """Llama-family attention with llamazh's rotary; attention itself is transformers' choice.

    The 4th parameter is the KV cache under whichever name the replaced forward used
    (``self._llamazh_contract``, checked when the patch was made).
    """
    contract = self._llamazh_contract
    cache = contract.take_cache(cache, kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape)  # (B, S, H, D)
    k = self.k_proj(hidden_states).view(hidden_shape)  # (B, S, Hkv, D)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, S, D)
    cos, sin = position_embeddings
    rotary = self._llamazh_rotary  # set: consistent-cache mode, keys are rotated after caching
    q, k_rot = apply_rotary(
        q, None if rotary is not None else k, cos, sin, rotary_dim=cos.shape[-1]
    )
    q = q.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D)
    k = (k if rotary is not None else k_rot).transpose(1, 2)  # (B, Hkv, S, D)
    if cache is not None:
        k, v = contract.update(cache, k, v, self.layer_idx, kwargs)
    if rotary is not None:
        k = _rotate_all_keys(k, rotary, kwargs.get("position_ids"), cos.shape[-1])

    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention = get_attention_function(self.config._attn_implementation, eager)
    if hasattr(self, "sliding_window"):  # Qwen2: per layer
        kwargs["sliding_window"] = self.sliding_window
    elif getattr(self.config, "sliding_window", None) is not None:  # Mistral
        kwargs["sliding_window"] = self.config.sliding_window
    out, weights = attention(
        self, q, k, v, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling, **kwargs,
    )  # fmt: skip
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _rotate_all_keys(
    k: torch.Tensor, rotary: Any, position_ids: torch.Tensor | None, rotary_dim: int
) -> torch.Tensor:
    """Rotate every (unrotated) cached key with the rotary's current frequencies.

    The cache holds the latest ``Lk`` keys of each row, the last one at the last query's
    position, so key ``j`` sits at ``position_ids[:, -1] - (Lk - 1) + j`` (left padding gets
    positions that are masked anyway).
    """
    if position_ids is None:
        raise ValueError("consistent_cache=True needs position_ids in the attention call")
    B, Lk = k.shape[0], k.shape[2]
    last = position_ids[:, -1:].expand(B, 1)  # (B, 1)
    positions = last - (Lk - 1) + torch.arange(Lk, device=k.device)  # (B, Lk)
    cos, sin = rope_cos_sin(
        rotary.inv_freq, positions, attention_factor=rotary.attention_scaling, full_width=False
    )  # (B, Lk, R/2) fp32
    k_rot, _ = apply_rotary(k, None, cos, sin, layout="bhsd", rotary_dim=rotary_dim)
    return k_rot


def from_pretrained(path: Any, *, model_class: Any = None, **kwargs: Any) -> Any:
    """Load a model whose config names any llamazh strategy (``rope_type="llamazh_*"`` too).

    Args:
        path: what ``from_pretrained`` takes (a directory or hub id).
        model_class: a transformers class (default ``AutoModelForCausalLM``).
        **kwargs: passed to ``from_pretrained`` (``torch_dtype``, ``device_map``, ...).

    Returns:
        The model, patched with the strategy its config names (for types transformers knows,
        exactly what stock ``from_pretrained`` returns).

    Example:
        >>> model = from_pretrained("out/llama-adaptive-ntk")
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    strategy = strategy_of(config)
    if strategy.hf_native:
        return model_class.from_pretrained(path, config=config, **kwargs)
    params = _rope_parameters(config)
    config.rope_parameters = {
        "rope_type": "default",
        **{k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params},
    }
    model = model_class.from_pretrained(path, config=config, **kwargs)
    patch_rope(model, strategy)
    return model
