"""The small shared type of every patch: one reversible modification of a model.

``llamazh.patching`` gathers :class:`Change` objects into a handle; the integrations that make
them (``llamazh.integrations.hf_*``, ``llamazh.training.prepare``) import this module, never
``llamazh.patching``, so no import runs in a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Change:
    """One reversible modification of a model.

    Attributes:
        what: a human-readable description (``"model.layers.0.self_attn.rotary_emb: ..."``).
        undo: restores exactly what was there before.
    """

    what: str
    undo: Callable[[], None]
