"""The ZO-SGD update of one parameter tensor, shared by every engine and by replay.

    theta <- theta - lr * (sum_j g_j z_j / q + decay * theta)

Because replay and the engines call the same function, rebuilding weights from the
trajectory log gives the checkpoint's weights bit for bit. In bf16/fp16 the new value
is computed in float32 and stochastically rounded: rounding to nearest would erase an
update smaller than half a unit in the last place, which for lr ~ 1e-6 is nearly all
of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distzo import directions
from distzo.directions import Kind

# Rounding noise comes from its own Philox stream, so it never correlates with z.
# Dtypes updated in place; narrower ones are updated in float32 and stochastically rounded.
FULL_PRECISION = (torch.float32, torch.float64)
SR_SEED_SALT = 0x5EED_0F_5EED_0F_5E


def sr_seed(seeds: Sequence[int]) -> int:
    """The seed of the rounding noise of the update made with ``seeds``."""
    return (seeds[0] ^ SR_SEED_SALT) & 0xFFFF_FFFF_FFFF_FFFF


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
    seeds: Sequence[int],
    grads: Sequence[float],
    lr: float,
    weight_decay: float = 0.0,
    kind: Kind = "gaussian",
    cached: Sequence[torch.Tensor] | None = None,
) -> None:
    """Apply one step's update to ``param`` in place.

    ``cached`` may hold the z of each direction (as drawn for the forward) to save
    regenerating them; it must be exactly what ``directions.direction_like`` gives.
    """
    q = len(seeds)
    full = param.dtype in FULL_PRECISION
    work = param.data if full else param.detach().to(torch.float32)
    step = torch.zeros_like(work)
    for j, (seed, g) in enumerate(zip(seeds, grads)):
        z = cached[j] if cached is not None else directions.direction_like(work, seed, key, kind)
        step.add_(z.to(work.dtype), alpha=g)
    if q > 1:
        step.div_(q)
    if weight_decay and decays(param):
        step.add_(work, alpha=weight_decay)
    if full:
        param.data.sub_(step, alpha=lr)
    else:
        new = work.sub(step, alpha=lr)
        param.data.copy_(stochastic_round(new, param.dtype, sr_seed(seeds), key))


def decays(param: torch.Tensor) -> bool:
    """MeZO's rule: no weight decay on biases and norm weights (the 1-D tensors)."""
    return param.ndim >= 2
