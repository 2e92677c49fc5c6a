"""Sparse MeZO (Liu et al., 2024, arXiv 2402.15751): ZO-SGD that perturbs and updates only
the small weights, where the noise of a zeroth-order estimate hurts least.

    h_k = the (1 - sparsity) quantile of |theta_0| over tensor k      (once, at step 0)
    m_t = |theta_t| <= h                                              (each step, per element)
    probes theta_t +- eps m_t z;  g = (L+ - L-) / (2 eps)
    theta <- round(theta_t - lr_t * m_t (sum_j g_j z_j / q + wd theta_t))

``sparsity`` is the paper's: the fraction of each tensor that is *not* tuned (its largest
weights), so 0.75 tunes the quarter of smallest magnitude. The thresholds are fixed at step 0
and the mask follows the weights: a weight that grows past its threshold stops moving (and
stops decaying: the mask covers the whole step). 1-D tensors (norm weights, biases) are
tuned whole: they are tiny, and their values cluster (norm weights near 1), so a quantile of
them would pick arbitrary elements. The engines take the mask from the weights as they go
(one compare per element, no mask in memory: the memory beyond MeZO's is one float per
tensor); a threshold of h_k is the k-th smallest |theta_0| in float32, an element of the
tensor, so it is exact and the same on every device.

The thresholds are the algorithm's state: checkpointed, and written into the trajectory line
of the step that computed them (``records.MASK_FIELD``), from which replay applies every
update with the run's masks and a resume from the log alone restores them. Everything else
(q directions, estimators, eps rules, transforms) is MeZO's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from distzo.algorithms import Finished, Forward
from distzo.algorithms.mezo import MeZO, OnMeZO
from distzo.records import MASK_FIELD


@dataclass
class SparseConfig:
    """Sparse MeZO's own settings (optim.sparse.*)."""

    sparsity: float = 0.75
    """The fraction of each matrix's weights, the largest in magnitude at step 0, that is not perturbed nor
    updated while it stays above that magnitude; 1-D tensors are tuned whole. 0 masks nothing (MeZO)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"optim.sparse.sparsity must be in [0, 1), got {self.sparsity}")


def threshold(weights: torch.Tensor, sparsity: float) -> float:
    """The magnitude below which (inclusive) a tensor's weights are tuned: the k-th smallest |w| in
    float32, k = n - floor(sparsity * n), so at least the (1 - sparsity) share of the tensor is tuned
    (more where magnitudes tie at the threshold). Computed on a CPU copy: one exact element, any device."""
    values = weights.detach().to("cpu", torch.float32).abs().flatten()
    n = values.numel()
    k = n - int(sparsity * n)
    return float(values.kthvalue(k).values)


def masked(weights: torch.Tensor) -> bool:
    """Which tensors are masked: the matrices (embeddings, projections); 1-D tensors are tuned whole."""
    return weights.ndim >= 2


class SparseMeZO(OnMeZO):
    name = "sparse"

    def __init__(self, sparsity: float = 0.75, **mezo: Any):
        self.own = SparseConfig(sparsity)
        self.mezo = MeZO(**mezo)  # the probes, the estimate and the update record
        self.masks: dict[str, float] | None = None
        """name -> threshold, read from the weights the first time a step asks (step 0)."""
        self._unlogged = False  # computed here and not yet in a trajectory line

    def thresholds(self, weights: Mapping[str, torch.Tensor]) -> Mapping[str, float]:
        if self.masks is None:
            # (sparsity 0 masks nothing: a threshold of the largest |theta_0| would still freeze a weight
            # that grows past it)
            matrices = [name for name, w in weights.items() if masked(w)] if self.own.sparsity else []
            self.masks = {name: threshold(weights[name], self.own.sparsity) for name in matrices}
            self._unlogged = True
        return self.masks

    def plan(self, step: int) -> list[Forward]:
        return self.mezo.plan(step)

    def finish(self, step: int, losses: list[list[float]]) -> Finished:
        done = self.mezo.finish(step, losses)
        if self._unlogged:  # the step that computed them records them, for replay and a resume from the log
            done.log[MASK_FIELD] = dict(self.masks)
            self._unlogged = False
        return done

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.own), **self.mezo.settings()}

    def state_dict(self) -> dict[str, Any]:
        masks = None if self.masks is None else dict(self.masks)
        return {**self.mezo.state_dict(), **asdict(self.own), "thresholds": masks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mezo.load_state_dict(state)
        self.own = SparseConfig(float(state["sparsity"]))
        saved = state.get("thresholds")
        self.masks = None if saved is None else {str(k): float(v) for k, v in saved.items()}
        self._unlogged = False

    def restore(self, lines: list[Mapping[str, Any]]) -> None:
        self.mezo.restore(lines)
        if not lines:
            return  # nothing ran: step 0 reads them from the weights
        logged = [line[MASK_FIELD] for line in lines if MASK_FIELD in line]
        if not logged:  # the weights have moved since step 0: they cannot be read again
            raise ValueError(f"the trajectory lines hold no {MASK_FIELD}: Sparse MeZO's thresholds cannot be rebuilt")
        self.masks = {str(k): float(v) for k, v in logged[-1].items()}
        self._unlogged = False
