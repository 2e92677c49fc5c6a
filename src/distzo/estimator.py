"""SPSA: from the losses of perturbed forwards to projected gradients.

two-sided: the halves see theta + eps z and theta - eps z;  g = (L+ - L-) / (2 eps)
one-sided: the halves see theta + eps z and theta;          g = (L+ - L0) / eps
"""

from __future__ import annotations

import math
from typing import Literal

Estimator = Literal["two-sided", "one-sided"]
ESTIMATORS = ("two-sided", "one-sided")


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")


def half_scales(eps: float, estimator: Estimator) -> tuple[float, float]:
    """The multiples of z that the two halves of the stacked batch see."""
    return (eps, -eps) if estimator == "two-sided" else (eps, 0.0)


def projected_grads(plus: list[float], other: list[float], eps: float, estimator: Estimator) -> list[float]:
    """One scalar per direction: the directional derivative estimate g_j."""
    if estimator == "two-sided":
        return [(lp - lm) / (2.0 * eps) for lp, lm in zip(plus, other)]
    return [(lp - l0) / eps for lp, l0 in zip(plus, other)]


def reported_loss(plus: list[float], other: list[float], estimator: Estimator) -> float:
    """The step's loss: the mean of L+ and L- (two-sided) or the unperturbed loss (one-sided)."""
    if estimator == "two-sided":
        return (sum(plus) + sum(other)) / (2 * len(plus))
    return sum(other) / len(other)


def all_finite(*values: list[float]) -> bool:
    return all(math.isfinite(v) for vs in values for v in vs)
