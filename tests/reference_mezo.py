"""MeZO's ZO-SGD step exactly as MeZO's trainer does it: four passes over the weights.

    theta += eps z;  L+ = L(theta);  theta -= 2 eps z;  L- = L(theta);  theta += eps z
    g = (L+ - L-) / (2 eps);  theta -= lr (g z + wd theta)      (no decay on 1-D tensors)

It uses distzo's direction generator (so both see the same z) and plain Hugging Face
forwards on the unstacked batch; nothing else of distzo.
"""

from __future__ import annotations

import torch

from distzo.directions import direction_like, stable_key, step_seed


def _loss(model, batch, loss_fn):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out = model(**inputs, use_cache=False)
    return float(loss_fn(out, batch).to(torch.float64).mean())


def _named(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def mezo_step(model, batch, step, *, lr, eps, weight_decay=0.0, run_seed=0, kind="gaussian", q=1, loss_fn,
              coeff=lambda g: g):
    """One MeZO step (q directions, each its own four passes); returns (losses+, losses-, grads).
    ``coeff(g)`` multiplies z in the update (sign-SGD: the sign of g)."""
    model.eval()
    plus, minus, grads, zs = [], [], [], []
    for j in range(q):
        seed = step_seed(run_seed, step, j, kind, q)
        z = {n: direction_like(p, seed, stable_key(n), kind).to(p.dtype) for n, p in _named(model)}
        for n, p in _named(model):
            p.data.add_(z[n], alpha=eps)
        lp = _loss(model, batch, loss_fn)
        for n, p in _named(model):
            p.data.add_(z[n], alpha=-2 * eps)
        lm = _loss(model, batch, loss_fn)
        for n, p in _named(model):
            p.data.add_(z[n], alpha=eps)
        plus.append(lp)
        minus.append(lm)
        grads.append((lp - lm) / (2 * eps))
        zs.append(z)
    for n, p in _named(model):
        step_vec = sum(coeff(g) * z[n] for g, z in zip(grads, zs)) / q
        decay = weight_decay * p.data if p.ndim >= 2 else 0.0
        p.data = p.data - lr * (step_vec + decay)
    return plus, minus, grads
