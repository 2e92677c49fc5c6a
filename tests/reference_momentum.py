"""Heavy-ball ZO-SGD with its momentum kept the obvious way: the last h estimates stored as
tensors, weighted and summed each step.

    d_t = sum_j g_{t,j} z_{t,j} / q          (MeZO's four passes per direction)
    m_t = sum_{a < n} (1 - beta) beta^a d_{t-a} / (1 - beta^n),   n = min(h, t + 1)
    theta -= lr (m_t + wd theta)

and the adam rule, with the same window's second moment (squares per element):

    v_t = sum_{a < n} (1 - beta2) beta2^a d_{t-a}^2 / (1 - beta2^n)
    theta -= lr (m_t / (sqrt(v_t) + delta) + wd theta)
"""

from __future__ import annotations

import torch
from reference_mezo import _loss, _named

from distzo.directions import direction_like, stable_key, step_seed


class MomentumReference:
    def __init__(self, model, *, lr, eps, beta, history, q=1, weight_decay=0.0, run_seed=0, kind="gaussian",
                 rule="heavy-ball", beta2=0.99, delta=1e-8):
        self.model, self.lr, self.eps, self.beta, self.h, self.q = model, lr, eps, beta, history, q
        self.rule, self.beta2, self.delta = rule, beta2, delta
        self.wd, self.run_seed, self.kind = weight_decay, run_seed, kind
        self.estimates: list[dict[str, torch.Tensor]] = []  # newest last

    @torch.no_grad()
    def step(self, batch, t, loss_fn) -> list[list[float]]:
        self.model.eval()
        losses, d = [], {n: torch.zeros_like(p) for n, p in _named(self.model)}
        for j in range(self.q):
            seed = step_seed(self.run_seed, t, j, self.kind, self.q)
            z = {n: direction_like(p, seed, stable_key(n), self.kind).to(p.dtype) for n, p in _named(self.model)}
            for n, p in _named(self.model):
                p.data.add_(z[n], alpha=self.eps)
            lp = _loss(self.model, batch, loss_fn)
            for n, p in _named(self.model):
                p.data.add_(z[n], alpha=-2 * self.eps)
            lm = _loss(self.model, batch, loss_fn)
            for n, p in _named(self.model):
                p.data.add_(z[n], alpha=self.eps)
            g = (lp - lm) / (2 * self.eps)
            for n in d:
                d[n] += g * z[n] / self.q
            losses.append([lp, lm])
        self.estimates = (self.estimates + [d])[-self.h :]
        for n, p in _named(self.model):
            m = self._average(self.beta, [e[n] for e in self.estimates])
            if self.rule == "adam":
                v = self._average(self.beta2, [e[n] ** 2 for e in self.estimates])
                m = m / (v.sqrt() + self.delta)
            decay = self.wd * p.data if p.ndim >= 2 else 0.0
            p.data = p.data - self.lr * (m + decay)
        return losses

    @staticmethod
    def _average(beta, values):
        """The bias-corrected exponential average of ``values`` (oldest first; 0.0**0 is 1)."""
        norm = 1 - beta ** len(values)
        return sum((1 - beta) * beta**a / norm * x for a, x in enumerate(reversed(values)))
