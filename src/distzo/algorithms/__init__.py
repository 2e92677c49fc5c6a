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
from dataclasses import dataclass
from typing import Any, Protocol

from distzo.records import UpdateRecord


@dataclass(frozen=True)
class Probe:
    seed: int
    """The direction z(seed) of the probe."""
    scale: float
    """The probe measures L(theta + scale * z); 0.0 is theta itself."""


@dataclass(frozen=True)
class Forward:
    """Probes measured by one forward of the batch stacked once per probe. They share one
    direction seed: the engines build every stream's shadow of a tensor in one pass over it."""

    probes: tuple[Probe, ...]

    def __post_init__(self) -> None:
        if len({p.seed for p in self.probes}) != 1:
            raise ValueError("the probes of one forward share one direction seed")

    @property
    def seed(self) -> int:
        return self.probes[0].seed

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(p.scale for p in self.probes)


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


class Algorithm(Protocol):
    name: str

    def plan(self, step: int) -> list[Forward]:
        """The forwards step ``step`` measures; a pure function of the step and the state."""

    def finish(self, step: int, losses: list[list[float]]) -> Finished:
        """The step's update from ``losses[i][k]``, the loss of probe k of forward i."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


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
    from distzo.algorithms.mezo import MeZO  # the algorithms import this module's types

    return {MeZO.name: MeZO}


_REGISTRY = _registry()
