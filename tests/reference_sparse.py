"""Sparse MeZO as its paper states it: MeZO's four in-place passes along a masked direction.

    h_k = the k-th smallest |theta_0| of tensor k, k = n - floor(sparsity n)   (matrices only)
    m = |theta_t| <= h  (1 everywhere for 1-D tensors),  z' = m * z
    theta += eps z';  L+ = L(theta);  theta -= 2 eps z';  L- = L(theta);  theta += eps z'
    g = (L+ - L-) / (2 eps);  theta -= lr m (sum_j g_j z_j / q + wd theta)   (no decay on 1-D tensors)

The thresholds come from a full sort and the masks are explicit tensors. It uses distzo's
direction generator (so both see the same z) and plain Hugging Face forwards; nothing else.
"""

from __future__ import annotations

import torch
from reference_mezo import _loss, _named

from distzo.directions import direction_like, stable_key, step_seed


def sorted_threshold(p: torch.Tensor, sparsity: float) -> float:
    """The magnitude of the last tuned element when |theta| (in float32) is sorted ascending."""
    mags = p.detach().float().abs().flatten().sort().values
    n = mags.numel()
    return float(mags[n - int(sparsity * n) - 1])


class SparseReference:
    def __init__(self, model, *, lr, eps, sparsity, q=1, weight_decay=0.0, run_seed=0, kind="gaussian"):
        self.model, self.lr, self.eps, self.q, self.wd = model, lr, eps, q, weight_decay
        self.run_seed, self.kind = run_seed, kind
        self.h = {n: sorted_threshold(p, sparsity) for n, p in _named(model) if p.ndim >= 2}

    def masks(self) -> dict[str, torch.Tensor]:
        """1.0 where a weight is tuned this step, 0.0 elsewhere, from the weights as they are now."""
        return {n: (p.float().abs() <= self.h[n]).to(p.dtype) if n in self.h else torch.ones_like(p)
                for n, p in _named(self.model)}

    @torch.no_grad()
    def step(self, batch, t, loss_fn) -> list[list[float]]:
        self.model.eval()
        m = self.masks()  # theta_t: the probes and the update of step t share one mask
        losses, d = [], {n: torch.zeros_like(p) for n, p in _named(self.model)}
        for j in range(self.q):
            seed = step_seed(self.run_seed, t, j, self.kind, self.q)
            z = {n: direction_like(p, seed, stable_key(n), self.kind).to(p.dtype) for n, p in _named(self.model)}
            for n, p in _named(self.model):
                p.data.add_(m[n] * z[n], alpha=self.eps)
            lp = _loss(self.model, batch, loss_fn)
            for n, p in _named(self.model):
                p.data.add_(m[n] * z[n], alpha=-2 * self.eps)
            lm = _loss(self.model, batch, loss_fn)
            for n, p in _named(self.model):
                p.data.add_(m[n] * z[n], alpha=self.eps)
            g = (lp - lm) / (2 * self.eps)
            for n in d:
                d[n] += g * z[n]
            losses.append([lp, lm])
        for n, p in _named(self.model):
            decay = self.wd * p.data if p.ndim >= 2 else 0.0
            p.data = p.data - self.lr * m[n] * (d[n] / self.q + decay)
        return losses
