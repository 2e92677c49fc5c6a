"""MeZO's ZO-SGD (Malladi et al., 2023): q directions per step, each one forward of two probes.

two-sided: the probes are theta + eps z and theta - eps z;  g = (L+ - L-) / (2 eps)
one-sided: the probes are theta + eps z and theta;          g = (L+ - L0) / eps

    theta <- round(theta - lr_t * (sum_j g_j z_j / q + wd * theta))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distzo import directions, estimator
from distzo.algorithms import Finished, Forward, Probe
from distzo.records import zo_sgd
from distzo.schedules import Schedule


class MeZO:
    name = "mezo"

    def __init__(self, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, directions: int = 1,
                 estimator: estimator.Estimator = "two-sided", seed: int = 0, schedule: Schedule | None = None):
        validate(lr, eps, weight_decay, directions, estimator)
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.num_directions, self.estimator, self.seed = directions, estimator, seed
        self.schedule = schedule or Schedule()

    def seeds(self, step: int) -> list[int]:
        return [directions.step_seed(self.seed, step, j) for j in range(self.num_directions)]

    def plan(self, step: int) -> list[Forward]:
        scales = estimator.half_scales(self.eps, self.estimator)
        return [Forward(tuple(Probe(s, scale) for scale in scales)) for s in self.seeds(step)]

    def finish(self, step: int, losses: list[list[float]]) -> Finished:
        plus, other = [pair[0] for pair in losses], [pair[1] for pair in losses]
        grads = estimator.projected_grads(plus, other, self.eps, self.estimator)
        lr = self.lr * self.schedule.factor(step)
        return Finished(zo_sgd(step, self.seeds(step), grads, lr, self.weight_decay),
                        estimator.reported_loss(plus, other, self.estimator), grads,
                        estimator.all_finite(plus, other))

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "lr": self.lr,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "directions": self.num_directions,
            "estimator": self.estimator,
            "schedule": vars(self.schedule).copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.lr, self.eps, self.weight_decay = state["lr"], state["eps"], state["weight_decay"]
        self.num_directions, self.estimator = state["directions"], state["estimator"]
        self.schedule = Schedule(**state["schedule"])


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
