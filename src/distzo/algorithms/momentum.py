"""Heavy-ball ZO-SGD whose momentum is rebuilt from the last h steps' seeds and estimates,
so no optimiser state is held in memory (the idea of AdaMeZO, arXiv 2605.00650).

    d_s = sum_j g_{s,j} z_{s,j} / q                          (MeZO's estimate at step s)
    m_t = sum_{a < n} w_a d_{t-a},   w_a = (1 - beta) beta^a / (1 - beta^n)
    theta <- round(theta - lr_t * (m_t + wd * theta))

over the n = min(h, applied steps so far) most recent applied updates: a truncated
exponential moving average with Adam's bias correction, so the weights sum to 1 and h = 1
is ZO-SGD. The update record carries all n * q seeds with their weights folded into the
coefficients; the fused kernel regenerates those directions in registers, so the cost is
compute (n * q Philox draws per element), not memory. The state is the last h steps' g's:
checkpointed, and rebuilt from the trajectory lines (which record them as ``g``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from distzo.algorithms import Finished, Forward
from distzo.algorithms.mezo import MeZO
from distzo.records import UpdateRecord, sr_seed


@dataclass
class MomentumConfig:
    """Momentum's own settings (optim.momentum.*)."""

    beta: float = 0.9
    """The momentum factor: past estimates weigh beta^age."""
    history: int = 8
    """h: the steps the momentum is rebuilt from (each adds q directions to every update's pass)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"optim.momentum.beta must be in [0, 1), got {self.beta}")
        if not (isinstance(self.history, int) and self.history >= 1):
            raise ValueError(f"optim.momentum.history must be an integer >= 1, got {self.history}")


class Momentum:
    name = "momentum"

    def __init__(self, beta: float = 0.9, history: int = 8, **mezo: Any):
        self.own = MomentumConfig(beta, history)
        self.mezo = MeZO(**mezo)  # the per-step estimate and its settings
        self.past: deque[tuple[int, list[float]]] = deque(maxlen=history)  # (step, g's) of applied updates

    def plan(self, step: int) -> list[Forward]:
        return self.mezo.plan(step)

    def finish(self, step: int, losses: list[list[float]]) -> Finished:
        grads, loss, finite = self.mezo.estimate(step, losses)
        if finite:
            self.past.append((step, list(grads)))
        record = self.update(step)
        return Finished(record, loss, grads, finite, {"g": list(grads), **self.mezo.eps_rule.log()})

    def update(self, step: int) -> UpdateRecord:
        """The record of step ``step``: the weighted estimates of the remembered steps, newest first."""
        beta, n = self.own.beta, len(self.past)
        norm = (1.0 - beta**n) if beta else 1.0
        seeds, coeffs = [], []
        for age, (s, grads) in enumerate(reversed(self.past)):
            weight = (1.0 - beta) * beta**age / norm if beta else float(age == 0)
            q = len(grads)
            seeds += self.mezo.seeds(s)
            coeffs += [weight * self.mezo.transformed(g) / q for g in grads]
        mine = self.mezo.seeds(step)
        if not seeds:  # nothing applied yet (the first steps' losses were not finite): no move
            seeds, coeffs = mine, [0.0] * len(mine)
        lr = self.mezo.lr * self.mezo.schedule.factor(step)
        return UpdateRecord(step, tuple(seeds), tuple(coeffs), lr, divisor=1, decay=self.mezo.weight_decay,
                            rounding_seed=sr_seed(mine))

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.own), **self.mezo.settings()}

    def state_dict(self) -> dict[str, Any]:
        return {**self.mezo.state_dict(), **asdict(self.own),
                "past": [{"step": s, "g": list(g)} for s, g in self.past]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mezo.load_state_dict(state)
        self.own = MomentumConfig(float(state["beta"]), int(state["history"]))
        self.past = deque(((int(p["step"]), list(p["g"])) for p in state["past"]), maxlen=self.own.history)

    def restore(self, lines: list[Mapping[str, Any]]) -> None:
        self.mezo.restore(lines)
        applied = [(int(line["step"]), list(line["g"])) for line in lines if not line.get("skipped")]
        self.past = deque(applied[-self.own.history :], maxlen=self.own.history)
