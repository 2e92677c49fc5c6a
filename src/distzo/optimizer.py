"""ZOOptimizer: a zeroth-order algorithm (MeZO's ZO-SGD by default) with counter-based
directions and a dual-stream forward.

    opt = ZOOptimizer(model, lr=1e-6, eps=1e-3)
    stats = opt.step(batch)        # two perturbed losses from one forward of 2R rows
    opt.flush()                    # apply the deferred update before eval or save

A step measures the algorithm's plan of probes (``distzo.algorithms``) and gets back an
update record: a few bytes. It is kept pending and applied at the start of the next step
(or by ``flush``), which is where fused engines fold it into the next pass over the weights.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from distzo import algorithms, directions, kernels, parallel, records
from distzo.directions import Kind, check_kind
from distzo.estimator import Estimator
from distzo.losses import IGNORE_INDEX
from distzo.offload import OffloadEngine
from distzo.schedules import Schedule
from distzo.units import DualStream, TrainableParam, find_units, split_rows, trainable_params
from distzo.records import UpdateRecord
from distzo.update import apply_record, perturbed

# Batch keys the model's forward receives; others (labels, gold, ...) are for the loss.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds", "logits_to_keep")
# Keep the step's z in memory between the forward and the update when it fits:
# it saves regenerating z, the main cost of a step on the CPU.
DEFAULT_CACHE_BYTES = 2 << 30
LOSS_CHUNK = 1 << 26  # logits elements reduced at once by causal_lm_loss

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]


def causal_lm_loss(outputs, batch: Mapping[str, Any]) -> torch.Tensor:
    """Mean next-token NLL over the label tokens (labels = input_ids when absent).

    Large logits are reduced a slice of positions at a time, so the float32 copy and the
    softmax never hold more than LOSS_CHUNK elements (a 2048-token row of a 50k vocabulary
    would otherwise need two 400 MB temporaries: the peak of an offloaded step).
    """
    labels = batch.get("labels", batch["input_ids"])[:, 1:].to(outputs.logits.device)
    logits = outputs.logits[:, :-1]
    wide = torch.promote_types(logits.dtype, torch.float32)
    if logits.numel() <= LOSS_CHUNK:
        return nn.functional.cross_entropy(logits.to(wide).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=IGNORE_INDEX)
    span = max(1, LOSS_CHUNK // logits.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row in range(logits.shape[0]):
        for lo in range(0, logits.shape[1], span):
            part = logits[row, lo : lo + span].to(wide)
            nll = nn.functional.cross_entropy(part, labels[row, lo : lo + span], ignore_index=IGNORE_INDEX,
                                              reduction="sum")
            total += nll.to(torch.float64)
    return (total / (labels != IGNORE_INDEX).sum()).to(wide)


@dataclass
class StepStats:
    step: int
    loss: float
    projected_grads: list[float]
    seeds: list[int]
    lr: float
    losses_plus: list[float] = field(default_factory=list)
    losses_other: list[float] = field(default_factory=list)
    skipped: bool = False
    update: UpdateRecord | None = None
    """The step's update (what the trajectory log records); not applied when ``skipped``."""


class ZOOptimizer:
    """Zeroth-order SGD over the parameters of ``model`` that require grad."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        directions: int = 1,
        perturbation: Kind = "gaussian",
        seed: int = 0,
        loss_fn: LossFn | None = None,
        schedule: Schedule | None = None,
        estimator: Estimator = "two-sided",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        mesh: parallel.Mesh | None = None,
        offload: OffloadEngine | None = None,
        algorithm: str | algorithms.Algorithm = "mezo",
    ):
        """``algorithm`` is a name, built with the hyper-parameters lr .. schedule, or an
        algorithm already built (then those are not used)."""
        check_kind(perturbation)
        if isinstance(algorithm, str):
            algorithm = algorithms.make(algorithm, lr=lr, eps=eps, weight_decay=weight_decay, directions=directions,
                                        estimator=estimator, seed=seed, schedule=schedule)
        self.algorithm = algorithm
        self.model = model
        self.perturbation = perturbation
        self.loss_fn = loss_fn or causal_lm_loss
        # Ranks of a torchrun job share seeds and exchange only losses (distzo.parallel).
        self.mesh = mesh
        # Blocks in host memory stream through the GPU (distzo.offload); the optimiser tells the
        # engine which parameters it updated so they are written back.
        self.offload = offload
        self.loss_weight = parallel.loss_weight  # a data shard's share of a loss_fn mean
        self.params: list[TrainableParam] = trainable_params(model)
        self.units = find_units(model, self.params)
        self._by_name = {p.name: p for p in self.params}
        self._by_id = {id(p.param): p for p in self.params}
        self._numel = sum(p.param.numel() for p in self.params)
        self.cache_bytes = cache_bytes
        self.cache_directions = False  # set per step, by the size of the step's plan
        self._z: dict[str, list[torch.Tensor]] = {}  # this step's directions, when cached
        self._z_prev: dict[str, list[torch.Tensor]] = {}  # the previous step's directions
        self._z_seeds: tuple[int, ...] = ()  # the seeds of _z's directions, in order
        self._z_prev_seeds: tuple[int, ...] = ()
        self._applying: UpdateRecord | None = None
        self._unapplied: set[str] = set()
        self.device = offload.device if offload is not None else self.params[0].param.device
        self._fused = kernels.fused_for(torch.empty(0, device=self.device))
        self._seed = 0
        self._direction = 0
        self.pending: UpdateRecord | None = None
        self.step_count = 0
        # Offloaded blocks build one stream's shadows at a time: their memory is what limits
        # the model size, and the second read of theta hides behind the PCIe transfers.
        offloaded = {id(b.module) for b in offload.blocks} if offload is not None else set()
        if offload is not None:
            offload.reapply_with(self._reapply)
        self._stream = DualStream(self.units, {p.name: p.param for p in self.params}, self._shadow,
                                  lean=(lambda unit: id(unit.module) in offloaded) if offloaded else None)

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def step(self, batch: Mapping[str, Any]) -> StepStats:
        """Measure the algorithm's plan at the current weights and queue the update it makes.

        The pending update of the previous step is applied unit by unit as the first
        forward reaches it, in the same pass over the weights that builds the shadows.
        """
        t = self.step_count
        forwards = self.algorithm.plan(t)
        if any(len(f.probes) != 2 for f in forwards):  # the mesh's pert axis splits a forward's pair
            raise ValueError(f"{self.algorithm.name}: the engines measure forwards of two probes")
        halves = parallel.my_halves(self.mesh)
        measured: dict[tuple[int, int], float] = {}
        was_training = self.model.training
        self.model.eval()  # no dropout: both halves must see the same function
        self._begin_update(forwards)
        try:
            for i in parallel.my_directions(self.mesh, len(forwards)):
                self._seed, self._direction = forwards[i].seed, i
                losses = self.stream_losses(batch, tuple(forwards[i].scales[h] for h in halves))
                measured.update({(i, h): loss for h, loss in zip(halves, losses)})
                self._finish_update()
        finally:
            self.model.train(was_training)
        self._finish_update()  # a rank that measured no direction still applies the update
        if self.offload is not None:
            self.offload.after_step()
        plus, other = parallel.assemble(self.mesh, measured, len(forwards), self._shard_weight(batch))
        done = self.algorithm.finish(t, [list(pair) for pair in zip(plus, other)])
        update = done.update
        stats = StepStats(t, done.loss, done.projected_grads, list(update.seeds), update.lr, plus, other,
                          update=update)
        if done.finite:
            self.pending = update
        else:
            warnings.warn(f"step {t}: non-finite loss ({plus}, {other}); the update is skipped", stacklevel=2)
            stats.skipped = True
            self._z.clear()
        self.step_count += 1
        return stats

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending update, if any, to the weights (before eval, save or replay)."""
        self._begin_update([])
        self._finish_update()
        if self.offload is not None:
            self.offload.synchronize()  # the host copies are what eval and save read

    def _begin_update(self, forwards: list[algorithms.Forward]) -> None:
        self._applying, self.pending = self.pending, None
        self._unapplied = {p.name for p in self.params} if self._applying else set()
        self._z_prev, self._z = self._z, {}
        self._z_prev_seeds, self._z_seeds = self._z_seeds, tuple(f.seed for f in forwards)
        # A rank that measures only some forwards would cache only those z's.
        shares = self.mesh is not None and self.mesh.size("dir") > 1
        self.cache_directions = self._numel * 4 * len(forwards) <= self.cache_bytes and not shares

    def _finish_update(self) -> None:
        """Apply the pending update to every parameter the forward did not reach."""
        left = [self._by_name[name] for name in self._unapplied]
        if self.offload is None:
            for p in left:
                self._apply_pending(p)
        else:  # an offloaded block comes up once for all its parameters
            blocks = {p.name: self.offload.block_of(p.param) for p in left}
            left.sort(key=lambda p: -1 if blocks[p.name] is None else blocks[p.name].index)
            for block, group in itertools.groupby(left, key=lambda p: blocks[p.name]):
                with self.offload.holding(block):
                    for p in group:
                        self._apply_pending(p)
        self._applying = None
        self._z_prev, self._z_prev_seeds = {}, ()

    def _apply_pending(self, p: TrainableParam) -> None:
        self._unapplied.discard(p.name)
        u = self._applying
        cached = self._z_prev.pop(p.name, None)
        # the z's measured last step are this update's only when it moves along those directions
        self._apply(p, u, cached if u.seeds == self._z_prev_seeds else None)
        if self.offload is not None:
            self.offload.updated(p.param, u)

    def _reapply(self, param: torch.Tensor, record: UpdateRecord) -> None:
        """Apply a past update again (to a block whose host copy lacks it; distzo.offload)."""
        self._apply(self._by_id[id(param)], record)

    def _apply(self, p: TrainableParam, record: UpdateRecord, cached: list[torch.Tensor] | None = None) -> None:
        apply_record(p.param, p.key, record, self.perturbation, self._fused, cached)

    def state_dict(self) -> dict[str, Any]:
        pending = None if self.pending is None else asdict(self.pending)
        return {
            "step": self.step_count,
            "algorithm": self.algorithm.name,
            **self.algorithm.state_dict(),
            "perturbation": self.perturbation,
            "pending": pending,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = current_state(state)
        name = state["algorithm"]
        if name != self.algorithm.name:
            raise ValueError(f"the state is {name}'s, but this optimiser runs {self.algorithm.name}")
        self.step_count = int(state["step"])
        self.algorithm.load_state_dict(state)
        self.perturbation = state["perturbation"]
        self.pending = _pending_from_state(state.get("pending"), state.get("weight_decay", 0.0))
        self._z.clear()

    # ------------------------------------------------------------------ internals

    def _shard_weight(self, batch: Mapping[str, Any]) -> float:
        """This data shard's weight in the global loss; 1 when there is one shard (exact)."""
        if self.mesh is None or self.mesh.size("data") == 1:
            return 1.0
        return self.loss_weight(batch)

    def stream_losses(self, batch: Mapping[str, Any], scales: tuple[float, ...]) -> list[float]:
        """L(theta + s z) for each scale s, from one forward of the batch stacked len(scales) times."""
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and v is not None}
        rows, parts = _rows(inputs), len(scales)
        device = self.device
        stacked = {k: torch.cat([v] * parts).to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with self._stream.active(rows, scales):
            outputs = self.model(**stacked, use_cache=False)
        losses = []
        for part in range(parts):
            loss = self.loss_fn(split_rows(outputs, rows, part, parts), batch)
            losses.append(float(loss.to(torch.float64).mean()))
        return losses

    def _direction_of(self, p: TrainableParam) -> torch.Tensor:
        cache = self._z.get(p.name)
        if cache is not None and len(cache) > self._direction:
            return cache[self._direction]
        z = directions.direction_like(p.param, self._seed, p.key, self.perturbation)
        if self.cache_directions:
            self._z.setdefault(p.name, []).append(z)
        return z

    def _shadow(self, name: str, param: torch.Tensor, scales: tuple[float, float]) -> tuple[torch.Tensor, ...]:
        """theta + a*z and theta + b*z in the parameter's dtype; theta itself is never written."""
        p = self._by_name[name]
        if self._fused is not None:
            update = self._applying if p.name in self._unapplied else None
            self._unapplied.discard(p.name)
            # The kernel builds two shadows; a single stream (a pert rank) asks for one.
            pair = scales if len(scales) == 2 else (scales[0], 0.0)
            shadows = self._fused.update_and_shadows(param, p.key, update, self.perturbation, self._seed, pair)
            if update is not None and self.offload is not None:
                self.offload.updated(p.param, update)
            return shadows[: len(scales)]
        if p.name in self._unapplied:
            self._apply_pending(p)
        z = self._direction_of(p)
        return tuple(perturbed(param, z, s) for s in scales)


def current_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A saved optimiser state with the fields of this version: states saved before
    algorithms were named are MeZO's."""
    return {"algorithm": "mezo", **state}


def _pending_from_state(pending: Mapping[str, Any] | None, weight_decay: float) -> UpdateRecord | None:
    """The saved pending update; checkpoints written before update records hold a log line's fields."""
    if not pending:
        return None
    if "coeffs" not in pending:
        return records.from_log(pending, weight_decay)
    return UpdateRecord(**pending)  # seeds may come back as decimal strings: the record reads them


def _rows(inputs: Mapping[str, Any]) -> int:
    for value in inputs.values():
        if torch.is_tensor(value):
            return value.shape[0]
    raise ValueError("the batch has no input tensor (expected input_ids or inputs_embeds)")
