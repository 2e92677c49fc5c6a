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

``rule: adam`` rebuilds a second moment the same way, from the same seeds and g's:

    v_t = sum_{a < n} w2_a d_{t-a}^2,   w2_a = (1 - beta2) beta2^a / (1 - beta2^n)   (per element)
    theta <- round(theta - lr_t * (m_t / (sqrt(v_t) + delta) + wd * theta))

This is not a sum of directions, so the record says so (``UpdateRecord.adam``: each step's
number of directions and its two weights; the coefficients are then the unweighted g / q of
each step). Its lr is of another scale than heavy-ball's: m / sqrt(v) is of order 1 per
element (on the first step, n = 1, it is sign(d) exactly), so every element moves about lr a
step, as in Adam. Heavy-ball moves lr * |m|, with |m| of order |g| (the loss change per unit
of eps, often 1-100 on an LM), so an adam run wants an lr like a first-order Adam's rather
than MeZO's. Cost: the same h * q draws per element; the fused kernel keeps each step's d, m
and v in registers (one pass over theta on CUDA), the torch path three temporaries the size of
the tensor being updated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from distzo.algorithms import Finished, Forward
from distzo.algorithms.mezo import MeZO, OnMeZO
from distzo.records import UpdateRecord, sr_seed


@dataclass
class MomentumConfig:
    """Momentum's own settings (optim.momentum.*)."""

    beta: float = 0.9
    """The momentum factor: past estimates weigh beta^age."""
    history: int = 8
    """h: the steps the momentum is rebuilt from (each adds q directions to every update's pass)."""
    rule: str = "heavy-ball"
    """heavy-ball: theta -= lr m. adam: theta -= lr m / (sqrt(v) + delta), v the same window's
    second moment, so each element moves about lr a step (an Adam-scale lr, not MeZO's)."""
    beta2: float = 0.99
    """The adam rule's second-moment factor. The window is h steps, so Adam's 0.999 (a memory of
    ~1000 steps) cannot act as such: after bias correction any beta2 near 1 averages the last h
    squares almost uniformly (0.999: the oldest of 8 weighs 0.993 of the newest). 0.99 (0.93) is as
    close to that as matters for h = 8 and still leans to recent steps for a longer window (h = 64:
    0.53), where 0.999 would stay flat; beta2 below beta (0.9) would let v forget faster than m."""
    delta: float = 1e-8
    """The adam rule's floor, sqrt(v) + delta per element, absolute in the units of d = g z
    (loss per unit of parameter): far below |g| for any measured loss change, it only keeps an
    element whose every direction drew ~0 from dividing by 0."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"optim.momentum.beta must be in [0, 1), got {self.beta}")
        if not (isinstance(self.history, int) and self.history >= 1):
            raise ValueError(f"optim.momentum.history must be an integer >= 1, got {self.history}")
        if self.rule not in RULES:
            raise ValueError(f"optim.momentum.rule must be one of {', '.join(RULES)}, got '{self.rule}'")
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"optim.momentum.beta2 must be in [0, 1), got {self.beta2}")
        if not self.delta > 0.0:
            raise ValueError(f"optim.momentum.delta must be > 0, got {self.delta}")

    def settings(self) -> dict[str, Any]:
        """The settings a run records; heavy-ball's are those it recorded before the adam rule
        existed, so its logs still resume."""
        own = asdict(self)
        if self.rule == "heavy-ball":
            del own["rule"], own["beta2"], own["delta"]
        return own


RULES = ("heavy-ball", "adam")


def weights(beta: float, n: int) -> list[float]:
    """The bias-corrected weights (1 - beta) beta^a / (1 - beta^n) of ages a < n (beta 0: the newest only)."""
    if not beta:
        return [float(a == 0) for a in range(n)]
    norm = 1.0 - beta**n
    return [(1.0 - beta) * beta**a / norm for a in range(n)]


class Momentum(OnMeZO):
    name = "momentum"

    def __init__(self, beta: float = 0.9, history: int = 8, rule: str = "heavy-ball", beta2: float = 0.99,
                 delta: float = 1e-8, **mezo: Any):
        self.own = MomentumConfig(beta, history, rule, beta2, delta)
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
        """The record of step ``step``: the remembered steps' seeds, newest first. Heavy-ball folds
        each step's weight w1 into its coefficients; the adam rule keeps each step's g / q (its d_s
        is rebuilt from them) and carries (q, w1, w2) per step."""
        adam = self.own.rule == "adam"
        past = list(reversed(self.past))
        w1, w2 = weights(self.own.beta, len(past)), weights(self.own.beta2, len(past))
        seeds, coeffs, groups = [], [], []
        for (s, grads), a, b in zip(past, w1, w2):
            scale = 1.0 if adam else a
            seeds += self.mezo.seeds(s)
            coeffs += [scale * self.mezo.transformed(g) / len(grads) for g in grads]
            groups.append((len(grads), a, b))
        mine = self.mezo.seeds(step)
        if not seeds:  # nothing applied yet (the first steps' losses were not finite): no move
            seeds, coeffs, groups = mine, [0.0] * len(mine), [(len(mine), 1.0, 1.0)]
        lr = self.mezo.lr * self.mezo.schedule.factor(step)
        rule = {"adam": tuple(groups), "delta": self.own.delta} if adam else {}
        return UpdateRecord(step, tuple(seeds), tuple(coeffs), lr, divisor=1, decay=self.mezo.weight_decay,
                            rounding_seed=sr_seed(mine), **rule)

    def settings(self) -> dict[str, Any]:
        return {**self.own.settings(), **self.mezo.settings()}

    def state_dict(self) -> dict[str, Any]:
        return {**self.mezo.state_dict(), **self.own.settings(),
                "past": [{"step": s, "g": list(g)} for s, g in self.past]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mezo.load_state_dict(state)
        # a state saved by heavy-ball (or before the adam rule) has no rule: heavy-ball's
        self.own = MomentumConfig(float(state["beta"]), int(state["history"]), state.get("rule", "heavy-ball"),
                                  float(state.get("beta2", 0.99)), float(state.get("delta", 1e-8)))
        self.past = deque(((int(p["step"]), list(p["g"])) for p in state["past"]), maxlen=self.own.history)

    def restore(self, lines: list[Mapping[str, Any]]) -> None:
        self.mezo.restore(lines)
        applied = [(int(line["step"]), list(line["g"])) for line in lines if not line.get("skipped")]
        self.past = deque(applied[-self.own.history :], maxlen=self.own.history)
