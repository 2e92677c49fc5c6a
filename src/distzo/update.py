"""The update of one parameter tensor from an update record, shared by every engine and by replay.

    theta <- round(theta - lr * (sum_j c_j z_j / divisor + decay * theta))

Because replay and the engines call the same function, rebuilding weights from the
trajectory log gives the checkpoint's weights bit for bit. In bf16/fp16 the new value
is computed in float32 and stochastically rounded: rounding to nearest would erase an
update smaller than half a unit in the last place, which for lr ~ 1e-6 is nearly all
of them.

A ``threshold`` masks the step (Sparse MeZO): only elements with |theta| <= threshold
(compared in float32) move, or are perturbed in a shadow; the others keep their bits. The
mask is taken from theta as it is when the function runs, so an update is masked by the
weights its step measured and a shadow by the weights it perturbs. None masks nothing.

An Adam-like record (``record.adam``; see ``distzo.records``) takes the step
m / (sqrt(v) + delta) in place of the coefficient sum; everything around it (decay, mask,
rounding) is the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distzo import directions
from distzo.directions import Kind
from distzo.records import UpdateRecord

# Dtypes updated in place; narrower ones are updated in float32 and stochastically rounded.
FULL_PRECISION = (torch.float32, torch.float64)


def stochastic_round(value: torch.Tensor, dtype: torch.dtype, seed: int, key: int) -> torch.Tensor:
    """Round float32 ``value`` to ``dtype`` up or down with probability by distance.

    E[result] == value exactly (unbiased), with noise that is a pure function of
    (seed, key, element index), so a resumed or replayed run rounds the same way.
    """
    nearest = value.to(dtype)
    err = value - nearest.to(torch.float32)
    toward = torch.where(err > 0, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(nearest, toward)
    gap = (other.to(torch.float32) - nearest.to(torch.float32)).abs()
    prob = torch.where(gap > 0, err.abs() / gap, torch.zeros_like(gap))
    u = directions.uniform(seed, key, 0, value.numel()).view(value.shape).to(value.device)
    return torch.where(u < prob, other, nearest)


def apply_update_(
    param: torch.Tensor,
    key: int,
    record: UpdateRecord,
    kind: Kind = "gaussian",
    cached: Sequence[torch.Tensor] | None = None,
    threshold: float | None = None,
) -> None:
    """Apply ``record`` to ``param`` in place (only where |param| <= ``threshold``, if given).

    ``cached`` may hold the z of each seed (as drawn for the forward) to save
    regenerating them; it must be exactly what ``directions.direction_like`` gives.
    """
    live = within(param, threshold)  # before the update: the weights the step measured at
    full = param.dtype in FULL_PRECISION
    work = param.data if full else param.detach().to(torch.float32)
    zs = _directions(work, key, record, kind, cached)
    step = _linear_step(work, record, zs) if record.adam is None else _adam_step(work, record, zs)
    if record.decay and decays(param):
        step.add_(work, alpha=record.decay)
    if live is not None:  # a zero step leaves theta's bits as they are, rounding included
        step = torch.where(live, step, 0.0)
    if full:
        param.data.sub_(step, alpha=record.lr)
    else:
        new = work.sub(step, alpha=record.lr)
        param.data.copy_(stochastic_round(new, param.dtype, record.rounding_seed, key))


def _directions(work, key, record, kind, cached):
    """The z of each seed, in the work dtype, one at a time (so at most one extra tensor is alive)."""
    for j, seed in enumerate(record.seeds):
        z = cached[j] if cached is not None else directions.direction_like(work, seed, key, kind)
        yield z.to(work.dtype)


def _linear_step(work: torch.Tensor, record: UpdateRecord, zs) -> torch.Tensor:
    """sum_j c_j z_j / divisor."""
    step = torch.zeros_like(work)
    for z, c in zip(zs, record.coeffs):
        step.add_(z, alpha=c)
    if record.divisor != 1:
        step.div_(record.divisor)
    return step


def _adam_step(work: torch.Tensor, record: UpdateRecord, zs) -> torch.Tensor:
    """m / (sqrt(v) + delta) from the record's step groups, accumulated in the work dtype
    (float32, or float64 for float64 tensors)."""
    m, v, d = torch.zeros_like(work), torch.zeros_like(work), torch.empty_like(work)
    coeffs = iter(record.coeffs)
    for n, w1, w2 in record.adam:
        d.zero_()
        for _ in range(n):
            d.add_(next(zs), alpha=next(coeffs))
        m.add_(d, alpha=w1)
        v.addcmul_(d, d, value=w2)
    return m.div_(v.sqrt_().add_(record.delta))


def apply_record(param: torch.Tensor, key: int, record: UpdateRecord, kind: Kind = "gaussian", fused=None,
                 cached: Sequence[torch.Tensor] | None = None, threshold: float | None = None) -> None:
    """Apply ``record`` to ``param`` the way a run does: with the fused kernel set ``fused``
    (``kernels.fused_for(param)``; the engine that trained on that device) or, for None or
    with ``cached`` z's, the torch path. Replay and the optimiser both come through here."""
    if fused is not None and cached is None:
        fused.apply_update(param, key, record, kind, threshold)
    else:
        apply_update_(param, key, record, kind, cached, threshold)


def perturbed(param: torch.Tensor, z: torch.Tensor, scale: float, threshold: float | None = None) -> torch.Tensor:
    """theta + scale * z in the parameter's dtype (computed in float32 for narrower ones); theta for 0.
    With ``threshold``, elements with |theta| > threshold stay theta."""
    if scale == 0.0:
        return param
    if param.dtype in FULL_PRECISION:
        shadow = param.add(z.to(param.dtype), alpha=scale)
    else:
        shadow = param.float().add_(z, alpha=scale).to(param.dtype)
    live = within(param, threshold)
    return shadow if live is None else torch.where(live, shadow, param)


def within(param: torch.Tensor, threshold: float | None) -> torch.Tensor | None:
    """The mask |theta| <= threshold, compared in float32 as the fused kernel compares; None for no threshold."""
    if threshold is None:
        return None
    return param.detach().to(torch.float32).abs() <= threshold


def decays(param: torch.Tensor) -> bool:
    """MeZO's rule: no weight decay on biases and norm weights (the 1-D tensors)."""
    return param.ndim >= 2
