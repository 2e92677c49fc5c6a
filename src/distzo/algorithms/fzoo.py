"""FZOO (Dang et al., 2025, arXiv 2506.09034): N one-sided probes around one theta, the step
normalised by the spread of their losses.

    L0 = L(theta),  L_i = L(theta + eps z_i)   (i = 1..N: N + 1 streams of one forward)
    sigma = std(L_1 .. L_N)                     (N - 1 in the denominator)
    theta <- round(theta - lr_t * (sum_i (L_i - L0) / (N sigma) z_i + wd * theta))

(L_i - L0) / sigma is scale-free, so the step is a normalised-SGD step whose size the
learning rate sets alone: large where the losses barely move, small where they spread.
The paper uses Rademacher directions (``--optim.perturbation rademacher``, or
``rademacher-shared``: the same distribution, every probe's sign of an element from one random
word, the cheapest on a GPU; or ``rademacher-packed``, 128 signs per draw). No state; the
engines hold N + 1 shadows of a unit at a time (lean offloaded units: one).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from distzo.algorithms import Finished, Forward, Probe, step_seeds
from distzo.algorithms.eps import EpsRule
from distzo.algorithms.mezo import _eps_settings, validate
from distzo.records import UpdateRecord, sr_seed
from distzo.schedules import Schedule


@dataclass
class FZOOConfig:
    """FZOO's own settings (optim.fzoo.*)."""

    probes: int = 8
    """N: perturbed probes per step, measured with the unperturbed one in one forward of N + 1 streams."""

    def __post_init__(self) -> None:
        if not (isinstance(self.probes, int) and self.probes >= 2):
            raise ValueError(f"optim.fzoo.probes must be an integer >= 2 (a spread needs two), got {self.probes}")


class FZOO:
    name = "fzoo"

    def __init__(self, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 schedule: Schedule | None = None, eps_rule: EpsRule | None = None, probes: int = 8,
                 directions: int = 1, estimator: str = "one-sided", perturbation: str | None = None):
        # FZOO is one-sided with its own probe count: MeZO's settings for these do not apply
        if directions != 1:
            raise ValueError(f"fzoo measures optim.fzoo.probes directions a step, not optim.directions ({directions})")
        validate(lr, eps, weight_decay, 1, "one-sided")
        self.own = FZOOConfig(probes)
        # the kind of z, which lays out the seeds (directions.step_seed); None: the optimiser's
        self.perturbation = perturbation
        self.lr, self.eps, self.weight_decay, self.seed = lr, eps, weight_decay, seed
        self.schedule = schedule or Schedule()
        self.eps_rule = eps_rule or EpsRule(eps, Schedule())

    def seeds(self, step: int) -> list[int]:
        return step_seeds(self, step, self.own.probes)

    def plan(self, step: int) -> list[Forward]:
        seeds, eps = self.seeds(step), self.eps_rule.at(step)
        return [Forward((Probe(seeds[0], 0.0), *(Probe(s, eps) for s in seeds)))]

    def finish(self, step: int, losses: list[list[float]]) -> Finished:
        base, probed = losses[0][0], losses[0][1:]
        finite = all(math.isfinite(v) for v in losses[0])
        sigma = statistics.stdev(probed) if finite else math.nan
        n = len(probed)
        # equal losses carry no direction: no step (rather than 0/0)
        coeffs = [(v - base) / (n * sigma) if sigma > 0 else 0.0 for v in probed] if finite else [0.0] * n
        eps = self.eps_rule.at(step)
        if finite:
            self.eps_rule.observe(sum(abs(v - base) for v in probed) / n)
        seeds = self.seeds(step)
        record = UpdateRecord(step, tuple(seeds), tuple(coeffs), self.lr * self.schedule.factor(step), divisor=1,
                              decay=self.weight_decay, rounding_seed=sr_seed(seeds))
        return Finished(record, base, [(v - base) / eps for v in probed], finite,
                        {"sigma": sigma if finite else None, **self.eps_rule.log()})

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.own), **_eps_settings(self.eps_rule)}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay,
                "probes": self.own.probes, "schedule": vars(self.schedule).copy(), **self.eps_rule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.lr, self.eps, self.weight_decay = state["lr"], state["eps"], state["weight_decay"]
        self.own = FZOOConfig(int(state["probes"]))
        self.schedule = Schedule(**state["schedule"])
        self.eps_rule.load_state_dict(state)

    def restore(self, lines: list[Mapping[str, Any]]) -> None:
        self.eps_rule.restore(lines)
