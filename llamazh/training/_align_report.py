"""What :func:`llamazh.training.align_embeddings` returns: the :class:`AlignmentReport`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AlignmentReport:
    """What :func:`align_embeddings` did.

    Attributes:
        curve: ``(alignment CPU seconds, bits per character of eval_texts)``, first at 0.
        steps: optimizer steps taken.
        teacher_tokens: base-tokenizer tokens the base model read.
        new_rows: rows the extension added; ``seen_rows`` of them occur in ``texts``.
        cpu_s, wall_s: alignment cost (evaluation excluded from ``cpu_s``).
        losses: ``(step, output loss in bits per extended token, input loss)`` per step.
    """

    curve: list[tuple[float, float]] = field(default_factory=list)
    steps: int = 0
    teacher_tokens: int = 0
    new_rows: int = 0
    seen_rows: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    losses: list[tuple[int, float, float]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"aligned {self.new_rows:,} new rows ({self.seen_rows:,} seen) in {self.steps} steps, "
            f"{self.teacher_tokens:,} teacher tokens, {self.cpu_s:.0f} CPU s ({self.wall_s:.0f} s)"
        ]
        lines += [f"  {cpu:8.1f} CPU s: {bpc:.3f} bits/char" for cpu, bpc in self.curve]
        return "\n".join(lines)
