"""The update record: everything one step changes in the weights, in a few bytes.

    theta <- round(theta - lr * (sum_j coeffs[j] z(seeds[j]) / divisor + decay * theta))

Every engine (torch, the fused kernels, offload's catch-up) and replay apply an update
from this record alone, so a record is the whole contract between an algorithm and the
engines. ``decay`` applies to the tensors ``update.decays`` selects (MeZO's rule); the
rounding is the stochastic rounding of bf16/fp16 tensors, its noise seeded by
``rounding_seed``. Dividing by ``divisor`` is a separate operation (not folded into the
coefficients) because that is the order MeZO's ZO-SGD computes in, and exactness needs
the same order.

An Adam-like record (``adam`` set; ``distzo.algorithms.momentum``'s adam rule) is not of that
form. Its seeds come in step groups; group s's coefficients make that step's estimate
d_s = sum_j coeffs[j] z(seeds[j]) over the group, and with the group's weights (w1_s, w2_s)

    m = sum_s w1_s d_s,   v = sum_s w2_s d_s^2   (per element)
    theta <- round(theta - lr * (m / (sqrt(v) + delta) + decay * theta))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

SEED_MASK = 0xFFFF_FFFF_FFFF_FFFF
# Rounding noise comes from its own Philox stream, so it never correlates with z.
SR_SEED_SALT = 0x5EED_0F_5EED_0F_5E
# A trajectory line may carry per-tensor mask thresholds {parameter name: float}: from that
# step's update on, a tensor named there moves only where |theta| <= its threshold (Sparse
# MeZO, ``distzo.algorithms.sparse``). Replay reads them from the log, as the run used them.
MASK_FIELD = "mask_thresholds"


@dataclass(frozen=True)
class UpdateRecord:
    step: int
    seeds: tuple[int, ...]
    """One direction seed per coefficient (unsigned 64-bit)."""
    coeffs: tuple[float, ...]
    """The multiple of each direction z(seeds[j]) in the step (MeZO: the projected gradient g_j)."""
    lr: float
    divisor: int = 1
    """The coefficient sum is divided by it (MeZO: q, the mean over directions); 1 divides nothing."""
    decay: float = 0.0
    """Weight decay: decay * theta joins the step of each tensor that ``update.decays``."""
    rounding_seed: int = 0
    """Seed of the stochastic-rounding noise of bf16/fp16 tensors."""
    adam: tuple[tuple[int, float, float], ...] | None = None
    """None for the linear records above. Otherwise one (directions, w1, w2) per step group, in the
    order of the seeds: the group's next ``directions`` seeds form its estimate d_s, which weighs
    w1 in the first moment and w2 (on d_s^2) in the second."""
    delta: float = 0.0
    """An Adam-like record's denominator floor, sqrt(v) + delta per element (in the units of d)."""

    def __post_init__(self) -> None:
        # ints from decimal strings too: JSON that keeps 64-bit seeds exact writes them so
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "coeffs", tuple(float(c) for c in self.coeffs))
        object.__setattr__(self, "rounding_seed", int(self.rounding_seed))
        if self.adam is not None:  # from JSON lists too
            object.__setattr__(self, "adam", tuple((int(n), float(w1), float(w2)) for n, w1, w2 in self.adam))
            object.__setattr__(self, "delta", float(self.delta))
        if len(self.seeds) != len(self.coeffs):
            raise ValueError(f"an update needs one coefficient per seed, got {len(self.seeds)} seeds and "
                             f"{len(self.coeffs)} coefficients")
        if any(not 0 <= s <= SEED_MASK for s in (*self.seeds, self.rounding_seed)):
            raise ValueError("update seeds are unsigned 64-bit integers")
        if not (isinstance(self.divisor, int) and self.divisor >= 1):
            raise ValueError(f"an update's divisor is an integer >= 1, got {self.divisor!r}")
        if self.adam is not None:
            _check_adam(self)


def _check_adam(record: UpdateRecord) -> None:
    if sum(n for n, _, _ in record.adam) != len(record.seeds) or any(n < 1 for n, _, _ in record.adam):
        raise ValueError(f"an Adam-like update's groups ({[n for n, _, _ in record.adam]}) must cover its "
                         f"{len(record.seeds)} seeds, each with at least one")
    if not record.delta > 0.0:
        raise ValueError(f"an Adam-like update's delta must be > 0, got {record.delta}")
    if record.divisor != 1:
        raise ValueError("an Adam-like update divides nothing: its groups' coefficients are the estimates'")


def sr_seed(seeds: Sequence[int]) -> int:
    """ZO-SGD's rounding seed: derived from the step's first direction seed."""
    return (int(seeds[0]) ^ SR_SEED_SALT) & SEED_MASK


def zo_sgd(step: int, seeds: Sequence[int], grads: Sequence[float], lr: float, weight_decay: float) -> UpdateRecord:
    """MeZO's ZO-SGD step: theta -= lr * (mean_j g_j z_j + wd * theta)."""
    return UpdateRecord(step, tuple(seeds), tuple(grads), lr, divisor=len(seeds), decay=weight_decay,
                        rounding_seed=sr_seed(seeds))


def from_log(line: Mapping[str, Any], weight_decay: float) -> UpdateRecord:
    """The update of a trajectory log line (or a saved pending update: the same fields).

    A ZO-SGD line holds (step, seeds, g's, lr), the run's weight decay is in the log's header;
    any other record's line holds every field of the record (``log_fields``).
    """
    if "divisor" in line:
        return UpdateRecord(int(line["step"]), line["seeds"], line["grads"], line["lr"], int(line["divisor"]),
                            line["decay"], line["rounding_seed"], line.get("adam"), line.get("delta", 0.0))
    return zo_sgd(int(line["step"]), [int(s) for s in line["seeds"]], line["grads"], line["lr"], weight_decay)


def log_fields(record: UpdateRecord) -> dict[str, Any]:
    """What a log line records of ``record``: the inverse of ``from_log``. ZO-SGD's records keep
    the line MeZO runs have always written; others add their divisor, decay and rounding seed
    ("grads" then holds the coefficients), and Adam-like ones their groups and delta too."""
    fields = {"step": record.step, "seeds": list(record.seeds), "grads": list(record.coeffs), "lr": record.lr}
    if not _is_zo_sgd(record):
        fields.update(divisor=record.divisor, decay=record.decay, rounding_seed=str(record.rounding_seed))
    if record.adam is not None:
        fields.update(adam=[list(group) for group in record.adam], delta=record.delta)
    return fields


def state_fields(record: UpdateRecord) -> dict[str, Any]:
    """Every field of ``record`` for a saved state (``UpdateRecord(**fields)`` reads it back); a linear
    record leaves out the Adam-like fields, so its saved state is what it was before they existed."""
    fields = asdict(record)
    if record.adam is None:
        del fields["adam"], fields["delta"]
    return fields


def _is_zo_sgd(record: UpdateRecord) -> bool:
    return bool(record.seeds) and record == zo_sgd(record.step, record.seeds, record.coeffs, record.lr, record.decay)
