"""``llamazh.patch``: make an already loaded Hugging Face model use llamazh pieces.

Patching replaces attributes on *that model instance* (never transformers' module globals),
records every change, and can be undone. The rope and attention integrations each return a
list of :class:`Change`; :func:`patch` gathers them into one :class:`PatchHandle`.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

from llamazh._change import Change

__all__ = ["Change", "PatchHandle", "patch"]

# Live handles per model, oldest first. Each change records what was there *before it*, so only
# the newest live handle can be undone without resurrecting an older patch's state.
_LIVE: weakref.WeakKeyDictionary[Any, list[PatchHandle]] = weakref.WeakKeyDictionary()


@dataclass
class PatchHandle:
    """What :func:`patch` changed on a model; ``undo()`` restores it (also as a context manager).

    Example:
        >>> handle = llamazh.patch(model, rope=LinearScaling(factor=4.0))
        >>> print(handle.changes)
        >>> handle.undo()
    """

    model: Any
    changes: list[Change] = field(default_factory=list)
    undone: bool = False

    def undo(self) -> None:
        """Revert every change, newest first, restoring the model as it was before this patch.

        Raises:
            RuntimeError: called twice, or a later patch of the same model is still live (undo
                that one first; nothing is changed then).
        """
        if self.undone:
            raise RuntimeError("this patch has already been undone")
        live = _LIVE.get(self.model, [])
        at = next((i for i, h in enumerate(live) if h is self), None)  # identity, not ==
        if at is not None and at != len(live) - 1:
            newer = live[at + 1 :]
            raise RuntimeError(
                f"patches of one model must be undone newest first: {len(newer)} later patch(es) "
                f"of this {type(self.model).__name__} are still live ({newer[-1].describe()[:2]}"
                "...); undo them first. Nothing was changed."
            )
        for change in reversed(self.changes):
            change.undo()
        self.undone = True
        if at is not None:
            del live[at]

    def describe(self) -> list[str]:
        """One line per change, in the order they were made."""
        return [change.what for change in self.changes]

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.undone:
            self.undo()


def patch(
    model: Any, *, rope: Any = None, attention: str | None = None, consistent_cache: bool = False
) -> PatchHandle:
    """Make a loaded transformers model use a llamazh rotary strategy and/or attention.

    Args:
        model: a transformers ``PreTrainedModel`` whose rotary embedding follows the
            ``LlamaRotaryEmbedding`` contract (Llama, Mistral, Qwen2, ...).
        rope: a strategy from :mod:`llamazh.rope` (e.g. ``YaRNScaling(...)``), or ``None``.
        attention: ``"llamazh"`` to route attention through :func:`llamazh.attention.attention`,
            or ``None`` to leave it alone.
        consistent_cache: with a dynamic rotary strategy, keep keys already in a KV cache
            consistent with the current stretch (see
            :func:`llamazh.integrations.hf_rope.patch_rope`); ignored without ``rope``.

    Returns:
        A :class:`PatchHandle` listing the changes; ``handle.undo()`` reverts them.

    Raises:
        ValueError: if neither ``rope`` nor ``attention`` is given, or either is not supported
            by this model.

    Example:
        >>> from llamazh.rope import YaRNScaling
        >>> handle = llamazh.patch(model, rope=YaRNScaling(factor=4.0, original_max_position=4096))
        >>> handle.undo()
    """
    if rope is None and attention is None:
        raise ValueError("patch() needs rope=... and/or attention=..., got neither")
    handle = PatchHandle(model)
    try:
        if rope is not None:
            from llamazh.integrations.hf_rope import patch_rope

            handle.changes.extend(patch_rope(model, rope, consistent_cache=consistent_cache))
        if attention is not None:
            from llamazh.integrations.hf_attention import patch_attention

            handle.changes.extend(patch_attention(model, attention))
    except BaseException:
        handle.undo()  # leave the model as it was when any part fails
        raise
    with contextlib.suppress(TypeError):  # no weak references: the order is then not checked
        _LIVE.setdefault(model, []).append(handle)
    return handle
