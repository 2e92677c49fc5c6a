"""Learning-rate schedules: a pure function of the step, so resume and replay agree."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class Schedule:
    """lr(step) = peak * warm-up ramp * decay shape.

    name: constant | linear (to min_ratio * lr at total_steps) | cosine (likewise).
    warmup_steps: linear ramp from 0 over the first steps (0 = none).
    total_steps: the horizon of the decay (required for linear and cosine).
    """

    name: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.name != "constant" and (self.total_steps is None or self.total_steps <= 0):
            raise ValueError(f"the {self.name} schedule needs total_steps > 0")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.name == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape
