"""FZOO's step as its paper states it, with in-place perturbations (no streams, no records).

    L0 = L(theta);  for i in 1..N: theta += eps z_i;  L_i = L(theta);  theta -= eps z_i
    sigma = stdev(L_1..L_N);  theta -= lr (sum_i (L_i - L0) / (N sigma) z_i + wd theta)

It uses distzo's direction generator (so both see the same z) and plain Hugging Face
forwards on the unstacked batch; nothing else of distzo.
"""

from __future__ import annotations

import statistics

import torch
from reference_mezo import _loss, _named

from distzo.directions import direction_like, stable_key, step_seed


@torch.no_grad()
def fzoo_step(model, batch, step, *, lr, eps, probes, weight_decay=0.0, run_seed=0, kind="gaussian", loss_fn):
    """One FZOO step; returns [L0, L_1, .., L_N]."""
    model.eval()
    base = _loss(model, batch, loss_fn)
    losses, zs = [], []
    for i in range(probes):
        seed = step_seed(run_seed, step, i, kind, probes)
        z = {n: direction_like(p, seed, stable_key(n), kind).to(p.dtype) for n, p in _named(model)}
        for n, p in _named(model):
            p.data.add_(z[n], alpha=eps)
        losses.append(_loss(model, batch, loss_fn))
        for n, p in _named(model):
            p.data.add_(z[n], alpha=-eps)
        zs.append(z)
    sigma = statistics.stdev(losses)
    for n, p in _named(model):
        direction = sum((l - base) / (probes * sigma) * z[n] for l, z in zip(losses, zs))
        decay = weight_decay * p.data if p.ndim >= 2 else 0.0
        p.data = p.data - lr * (direction + decay)
    return [base, *losses]
