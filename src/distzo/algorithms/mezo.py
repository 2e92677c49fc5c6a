"""MeZO's ZO-SGD (Malladi et al., 2023): q directions per step, each one forward of two probes.

two-sided: the probes are theta + eps z and theta - eps z;  g = (L+ - L-) / (2 eps)
one-sided: the probes are theta + eps z and theta;          g = (L+ - L0) / eps

    theta <- round(theta - lr_t * (sum_j c(g_j) z_j / q + wd * theta))

c is the identity (MeZO), sign(g) (sign-SGD) or g clipped to [-clip, clip]; eps may follow a
schedule or adapt to the loss difference (``distzo.algorithms.eps``). No state but the
adaptive eps factor; no memory beyond the engines' shadows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from distzo import estimator
from distzo.algorithms import Finished, Forward, Probe, step_seeds
from distzo.algorithms.eps import EpsRule
from distzo.records import zo_sgd
from distzo.schedules import Schedule

TRANSFORMS = ("plain", "sign", "clip")


@dataclass
class MeZOConfig:
    """MeZO's own settings (optim.mezo.*)."""

    transform: str = "plain"
    """plain | sign | clip: what multiplies z_j in the update: g_j, sign(g_j), or g_j clipped to ±clip."""
    clip: float = 1.0
    """The bound of the clip transform."""

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"optim.mezo.transform must be one of {', '.join(TRANSFORMS)}, got '{self.transform}'")
        if not self.clip > 0:
            raise ValueError(f"optim.mezo.clip must be > 0, got {self.clip}")


class MeZO:
    name = "mezo"

    def __init__(self, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, directions: int = 1,
                 estimator: estimator.Estimator = "two-sided", seed: int = 0, schedule: Schedule | None = None,
                 eps_rule: EpsRule | None = None, transform: str = "plain", clip: float = 1.0,
                 perturbation: str | None = None):
        validate(lr, eps, weight_decay, directions, estimator)
        # the kind of z, which lays out the seeds (directions.step_seed); None: the optimiser's
        self.perturbation = perturbation
        self.own = MeZOConfig(transform, clip)
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.num_directions, self.estimator, self.seed = directions, estimator, seed
        self.schedule = schedule or Schedule()
        self.eps_rule = eps_rule or EpsRule(eps, Schedule())

    def seeds(self, step: int) -> list[int]:
        return step_seeds(self, step, self.num_directions)

    def plan(self, step: int) -> list[Forward]:
        scales = estimator.half_scales(self.eps_rule.at(step), self.estimator)
        return [Forward(tuple(Probe(s, scale) for scale in scales)) for s in self.seeds(step)]

    def estimate(self, step: int, losses: list[list[float]]) -> tuple[list[float], float, bool]:
        """(g_j per direction, the reported loss, whether every loss is finite); moves the adaptive eps."""
        plus, other = [pair[0] for pair in losses], [pair[1] for pair in losses]
        eps = self.eps_rule.at(step)
        grads = estimator.projected_grads(plus, other, eps, self.estimator)
        finite = estimator.all_finite(plus, other)
        if finite:
            self.eps_rule.observe(sum(abs(p - o) for p, o in zip(plus, other)) / len(plus))
        return grads, estimator.reported_loss(plus, other, self.estimator), finite

    def finish(self, step: int, losses: list[list[float]]) -> Finished:
        grads, loss, finite = self.estimate(step, losses)
        coeffs = [self.transformed(g) for g in grads]
        lr = self.lr * self.schedule.factor(step)
        return Finished(zo_sgd(step, self.seeds(step), coeffs, lr, self.weight_decay), loss, grads, finite,
                        self.eps_rule.log())

    def transformed(self, g: float) -> float:
        if self.own.transform == "sign":
            return math.copysign(1.0, g) if g else 0.0
        if self.own.transform == "clip":
            return max(-self.own.clip, min(self.own.clip, g))
        return g

    def settings(self) -> dict[str, Any]:
        """The algorithm's own settings (the trajectory header records them)."""
        return {**asdict(self.own), **_eps_settings(self.eps_rule)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "lr": self.lr,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "directions": self.num_directions,
            "estimator": self.estimator,
            "schedule": vars(self.schedule).copy(),
            **self.eps_rule.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.lr, self.eps, self.weight_decay = state["lr"], state["eps"], state["weight_decay"]
        self.num_directions, self.estimator = state["directions"], state["estimator"]
        self.schedule = Schedule(**state["schedule"])
        self.eps_rule.load_state_dict(state)

    def restore(self, lines: list[Mapping[str, Any]]) -> None:
        self.eps_rule.restore(lines)


def _eps_settings(rule: EpsRule) -> dict[str, Any]:
    """The eps rule as header settings; empty for a constant eps (headers written before eps rules)."""
    out: dict[str, Any] = {}
    if rule.schedule.name != "constant":  # its horizon is `steps`, which a resumed run may extend
        out["eps_schedule"] = [rule.schedule.name, rule.schedule.min_ratio]
    if rule.band is not None:
        out["eps_band"] = list(rule.band)
    return out


def validate(lr, eps, weight_decay, q, est) -> None:
    """MeZO's hyper-parameters, checked where they are given (the optimiser, the HF Trainer's arguments)."""
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not (isinstance(q, int) and q >= 1):
        raise ValueError(f"directions must be an integer >= 1, got {q}")
    estimator.check_estimator(est)


class OnMeZO:
    """An algorithm built on MeZO's probes and estimate (``self.mezo``): the settings a caller
    reads from any algorithm, read through to it."""

    mezo: MeZO

    @property
    def schedule(self):
        """The lr schedule (what a caller reports the lr by: the HF Trainer's scheduler)."""
        return self.mezo.schedule

    @property
    def perturbation(self) -> str | None:
        """The kind of z the seeds are laid out for (``MeZO.perturbation``)."""
        return self.mezo.perturbation

    @perturbation.setter
    def perturbation(self, kind: str | None) -> None:
        self.mezo.perturbation = kind
