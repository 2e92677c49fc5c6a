"""Fused GPU kernels for the ZO step.

``fused_for(tensor)`` returns the kernel set for the tensor's device, or None where
the torch path in ``distzo.update`` and ``distzo.optimizer`` serves (CPU, or a GPU
without Triton). A kernel set provides

    update_and_shadows(param, key, record, kind, seed, scales, threshold=None)
        apply ``record`` (a ``distzo.records.UpdateRecord`` or None) to ``param`` in place and
        return (param + scales[0] z, param + scales[1] z) for z = z(seed, key), in one pass;
    update_and_shadows_of(param, key, record, kind, seeds, scales, threshold=None)
        the same for several seeds in one pass (theta read once; ``scales`` one pair per seed,
        every seed writing the same sides; at most ``MAX_SHADOW_SEEDS`` seeds), a pair per seed;
    update_and_shadows_grouped(group, record, kind, seeds, scales)
        ``update_and_shadows_of`` for every tensor of a ``Group`` (small tensors of one dtype,
        ``groupable``) in one launch, unmasked: a list of pairs per tensor;
    apply_update(param, key, record, kind, threshold=None)
        the update alone (``flush``, offload's catch-up, replay),

both masked to the elements with |param| <= ``threshold`` when one is given, with results
equal to the torch path's (same integer stream, same rounding rule, same mask).
"""

from __future__ import annotations

import torch


def fused_for(tensor: torch.Tensor):
    if tensor.device.type != "cuda":
        return None
    try:
        from distzo.kernels import triton_ops
    except ImportError:
        return None
    return triton_ops
