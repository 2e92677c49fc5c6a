"""Zeroth-order algorithms as plans of probes in, update records out.

A step evaluates the algorithm's *plan*: forwards, each a few probes (seed, scale) measured
as the streams of one stacked forward (scale 0 is theta itself). The losses go back to the
algorithm, which turns them into the step's update record. The optimiser, the mesh and the
offload engine run plans and apply records; they never know which algorithm made them.

    algo = make("mezo", eps=1e-3, ...)
    forwards = algo.plan(step)                  # what to measure
    result = algo.finish(step, losses)          # losses[i][k]: forward i, probe k
    result.update                               # a distzo.records.UpdateRecord
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from distzo import directions
from distzo.records import UpdateRecord
from distzo.schedules import Schedule


@dataclass(frozen=True)
class Probe:
    seed: int
    """The direction z(seed) of the probe."""
    scale: float
    """The probe measures L(theta + scale * z); 0.0 is theta itself."""


@dataclass(frozen=True)
class Forward:
    """Probes measured together: the batch stacked once per probe, one stream each.

    The probes may have different seeds (FZOO's N directions around one theta). The engines
    may measure several of a plan's forwards as one (the offload engine does, so a block comes
    up once per step) or split one over ranks (the pert axis); the losses are the same.
    """

    probes: tuple[Probe, ...]

    def __post_init__(self) -> None:
        if not self.probes:
            raise ValueError("a forward measures at least one probe")

    @property
    def seeds(self) -> tuple[int, ...]:
        """The distinct direction seeds of the probes, in order of first use."""
        return tuple(dict.fromkeys(p.seed for p in self.probes))


@dataclass(frozen=True)
class Finished:
    """What a step's losses make: the update and the step's statistics."""

    update: UpdateRecord
    loss: float
    """The step's reported loss."""
    projected_grads: list[float]
    """One scalar per forward (MeZO: the directional derivative estimate g_j)."""
    finite: bool
    """False when a loss was not finite: the update is then not applied."""
    log: dict[str, Any] = field(default_factory=dict)
    """Fields the step adds to its trajectory line, from which ``restore`` rebuilds the state
    (FZOO's loss spread, an adaptive eps); JSON values."""


class Algorithm(Protocol):
    name: str

    def plan(self, step: int) -> list[Forward]:
        """The forwards step ``step`` measures; a pure function of the step and the state."""

    def finish(self, step: int, losses: list[list[float]]) -> Finished:
        """The step's update from ``losses[i][k]``, the loss of probe k of forward i."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def restore(self, lines: list[Mapping[str, Any]]) -> None:
        """Rebuild the state a run had after the trajectory lines ``lines`` (steps 0..n-1): a run
        resumed from its log alone continues exactly. Stateless algorithms do nothing."""


class Masked(Protocol):
    """An algorithm that perturbs and updates part of each tensor (optional; ``distzo.algorithms.sparse``)."""

    def thresholds(self, weights: Mapping[str, Any]) -> Mapping[str, float]:
        """Per-tensor thresholds by parameter name: the engines perturb and update only the elements
        with |theta| <= threshold (tensors not named: all of them). Called before each step and
        flush with the current weights (name -> tensor); the algorithm decides when to read them."""


def thresholds(algorithm: Algorithm, weights: Mapping[str, Any]) -> dict[str, float]:
    """The algorithm's mask thresholds; none for an algorithm that perturbs whole tensors."""
    own = getattr(algorithm, "thresholds", None)
    return {} if own is None else dict(own(weights))


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def check_algorithm(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(_REGISTRY)}")


def make(name: str, **settings: Any) -> Algorithm:
    """The algorithm ``name`` with its settings (see each algorithm's constructor)."""
    check_algorithm(name)
    return _REGISTRY[name](**settings)


def _registry() -> dict[str, type]:
    # the algorithms import this module's types
    from distzo.algorithms.fzoo import FZOO
    from distzo.algorithms.mezo import MeZO
    from distzo.algorithms.momentum import Momentum
    from distzo.algorithms.sparse import SparseMeZO

    return {cls.name: cls for cls in (MeZO, FZOO, Momentum, SparseMeZO)}


def kind_of(algorithm: Algorithm) -> str:
    """The kind of z the algorithm lays its seeds out for (``perturbation``; None until ``adopt``:
    gaussian's layout, which every kind but rademacher-shared shares)."""
    return getattr(algorithm, "perturbation", None) or "gaussian"


def step_seeds(algorithm: Algorithm, step: int, count: int) -> list[int]:
    """The seeds of step ``step``'s ``count`` directions in the layout of the algorithm's kind of z."""
    return directions.step_seeds(algorithm.seed, step, count, kind_of(algorithm))


def adopt(algorithm: Algorithm, kind: str) -> None:
    """Lay out ``algorithm``'s seeds for the optimiser's kind of z (one built without a kind takes
    it). rademacher-shared puts consecutive directions in one family (``directions.step_seed``), so
    an algorithm built for another kind would draw the right z from needlessly many families."""
    own = getattr(algorithm, "perturbation", kind)
    if own is None:
        algorithm.perturbation = kind
    elif own != kind and "rademacher-shared" in (own, kind):
        raise ValueError(f"the algorithm lays out its seeds for {own} directions and the optimiser draws {kind}: "
                         f"build it with perturbation={kind!r} (or leave perturbation unset)")


def check_seeds(algorithm: Algorithm, line: Mapping[str, Any] | None) -> None:
    """Refuse to continue a run whose last logged step (``line``; None: none yet) did not measure
    the directions ``algorithm`` plans for that step, as a log written under another seed layout
    would not: the state rebuilt from the log would pair its g's with other z's."""
    if line is None:
        return
    step = int(line["step"])
    planned = {p.seed for forward in algorithm.plan(step) for p in forward.probes}
    if not planned <= {int(s) for s in line["seeds"]}:
        raise ValueError(f"step {step} of the run's log measured other directions than this distzo lays out for "
                         f"its {kind_of(algorithm)} directions; continue the run with the distzo version that wrote it")


def build(optim, seed: int, steps: int) -> Algorithm:
    """The algorithm an ``OptimConfig`` names, with the common settings and its own (optim.<name>.*)."""
    from distzo.algorithms.eps import EpsRule

    band = (optim.eps_band_low, optim.eps_band_high) if optim.eps_band_high > 0 else None
    eps_rule = EpsRule(optim.eps, Schedule(optim.eps_schedule, 0, steps, optim.eps_min_ratio), band)
    own = asdict(getattr(optim, optim.algorithm)) if hasattr(optim, optim.algorithm) else {}
    return make(optim.algorithm, lr=optim.lr, eps=optim.eps, weight_decay=optim.weight_decay,
                directions=optim.directions, estimator=optim.estimator, seed=seed,
                schedule=optim.schedule_for(steps), eps_rule=eps_rule, perturbation=optim.perturbation, **own)


_REGISTRY = _registry()
