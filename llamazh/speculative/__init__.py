"""Speculative decoding: exact verification, drafters, and the generation loop.

``from llamazh.speculative import speculative_generate, PromptLookupDrafter, SuffixDrafter``.
"""

from llamazh.speculative.drafters import (
    Draft,
    Drafter,
    ModelDrafter,
    PromptLookupDrafter,
    common_prefix_length,
)
from llamazh.speculative.loop import SpeculativeOutput, speculative_generate
from llamazh.speculative.suffix import SuffixDrafter
from llamazh.speculative.verify import Verdict, verify_greedy, verify_sampled

__all__ = [
    "Draft",
    "Drafter",
    "ModelDrafter",
    "PromptLookupDrafter",
    "SpeculativeOutput",
    "SuffixDrafter",
    "Verdict",
    "common_prefix_length",
    "speculative_generate",
    "verify_greedy",
    "verify_sampled",
]
