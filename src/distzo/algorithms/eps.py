"""The perturbation scale of a step: a schedule over the run, and an optional adaptive factor.

    eps_t = eps * schedule(t) * a_t

The schedule is a pure function of the step (``distzo.schedules``). The adaptive factor
a_t keeps the measured loss difference |L+ - L-| inside a band [low, high]: below it the
difference drowns in rounding noise (a larger eps lifts it), above it the finite
difference stops being local (a smaller eps). a_t changes by ``STEP`` per step and is part
of the trajectory: each log line records the factor the next step uses, so a run resumed
from its log alone continues with the same eps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distzo.schedules import Schedule

STEP = 1.25  # the adaptive factor's change per step: reaches 10x in ~10 steps
BOUNDS = (1e-2, 1e2)  # the adaptive factor stays within these multiples of the scheduled eps


@dataclass
class EpsRule:
    eps: float
    schedule: Schedule
    band: tuple[float, float] | None = None
    """The target band of |L+ - L-| for the adaptive factor; None keeps it at 1."""
    factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.band is not None and not 0 < self.band[0] < self.band[1]:
            raise ValueError(f"the adaptive eps band needs 0 < low < high, got {self.band}")

    def at(self, step: int) -> float:
        return self.eps * self.schedule.factor(step) * self.factor

    def observe(self, difference: float) -> None:
        """Move the adaptive factor after a step whose loss difference was ``difference``."""
        if self.band is None:
            return
        low, high = self.band
        if abs(difference) < low:
            self.factor = min(self.factor * STEP, BOUNDS[1])
        elif abs(difference) > high:
            self.factor = max(self.factor / STEP, BOUNDS[0])

    def log(self) -> dict[str, Any]:
        """The line fields ``restore`` reads: the factor of the next step (adaptive runs only)."""
        return {} if self.band is None else {"eps_factor": self.factor}

    def restore(self, lines: list[Mapping[str, Any]]) -> None:
        if self.band is not None:
            factors = [line["eps_factor"] for line in lines if "eps_factor" in line]
            self.factor = factors[-1] if factors else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"eps_factor": self.factor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.factor = float(state.get("eps_factor", 1.0))
