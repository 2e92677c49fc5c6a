"""ZOOptimizer: a zeroth-order algorithm (MeZO's ZO-SGD by default) with counter-based
directions and a multi-stream forward.

    opt = ZOOptimizer(model, lr=1e-6, eps=1e-3)
    stats = opt.step(batch)        # two perturbed losses from one forward of 2R rows
    opt.flush()                    # apply the deferred update before eval or save

A step measures the algorithm's plan of probes (``distzo.algorithms``) and gets back an
update record: a few bytes. It is kept pending and applied at the start of the next step
(or by ``flush``), which is where fused engines fold it into the next pass over the weights.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distzo import algorithms, directions, graphs, kernels, parallel, records
from distzo.directions import Kind, check_kind
from distzo.estimator import Estimator
from distzo.first_order import FirstOrder, check_offload
from distzo.losses import IGNORE_INDEX
from distzo.offload import OffloadEngine
from distzo.schedules import Schedule
from distzo.units import DualStream, TrainableParam, find_units, split_rows, trainable_params
from distzo.records import UpdateRecord
from distzo.update import apply_record, decays, perturbed

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
    losses: list[list[float]] = field(default_factory=list)
    """losses[i][k]: probe k of the plan's forward i."""
    skipped: bool = False
    update: UpdateRecord | None = None
    """The step's update (what the trajectory log records); not applied when ``skipped``."""
    log: dict[str, Any] = field(default_factory=dict)
    """The algorithm's own fields of the step's trajectory line."""

    @property
    def losses_plus(self) -> list[float]:
        """A pair plan's first probe per forward (MeZO: L(theta + eps z_j))."""
        return [f[0] for f in self.losses if len(f) == 2]

    @property
    def losses_other(self) -> list[float]:
        """A pair plan's second probe per forward (MeZO: L(theta - eps z_j), or L(theta))."""
        return [f[1] for f in self.losses if len(f) == 2]


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
        merge_forwards: bool = False,
        first_order: FirstOrder | None = None,
        cuda_graphs: bool = False,
        batch_streams: bool = False,
    ):
        """``algorithm`` is a name, built with the hyper-parameters lr .. schedule, or an
        algorithm already built (then those are not used). ``merge_forwards`` measures all of a
        step's probes in one forward (always so when offloaded): fewer passes over the weights,
        activations for every probe at once. ``first_order`` trains its parameters by backprop
        from the same forwards (``distzo.first_order``); ZO perturbs only the others.
        ``cuda_graphs`` replays each unit call of the forward from a CUDA graph once it has been
        seen twice (``distzo.graphs``): the same results, without the host's per-launch cost.
        ``batch_streams`` runs each block once over all probes' rows, only the layers owning
        perturbed parameters stream by stream (``distzo.units``): for LoRA, the frozen base's
        work once a forward instead of once a probe; the losses equal the unbatched ones up to the
        rounding of the frozen products over more rows."""
        check_kind(perturbation)
        if isinstance(algorithm, str):
            algorithm = algorithms.make(algorithm, lr=lr, eps=eps, weight_decay=weight_decay, directions=directions,
                                        estimator=estimator, seed=seed, schedule=schedule)
        algorithms.adopt(algorithm, perturbation)
        self.algorithm = algorithm
        _check_mesh(algorithm, mesh)
        self.model = model
        self.perturbation = perturbation
        self.loss_fn = loss_fn or causal_lm_loss
        # Ranks of a torchrun job share seeds and exchange only losses (distzo.parallel).
        self.mesh = mesh
        # Blocks in host memory stream through the GPU (distzo.offload); the optimiser tells the
        # engine which parameters it updated so they are written back.
        self.offload = offload
        self.loss_weight = parallel.loss_weight  # a data shard's share of a loss_fn mean
        self.merge_forwards = merge_forwards
        self.first_order = first_order
        _check_first_order(first_order, mesh, offload)
        excluded = first_order.ids if first_order is not None else set()
        self.params: list[TrainableParam] = [p for p in trainable_params(model) if id(p.param) not in excluded]
        self.units = find_units(model, self.params)
        self._by_name = {p.name: p for p in self.params}
        self._weights = {p.name: p.param for p in self.params}
        # name -> mask threshold of a masking algorithm (distzo.algorithms.Masked); none masks nothing
        self._thresholds: dict[str, float] = {}
        self._by_id = {id(p.param): p for p in self.params}
        self._numel = sum(p.param.numel() for p in self.params)
        self.cache_bytes = cache_bytes
        self.cache_directions = False  # set per step, by the size of the step's plan
        # name -> seed -> z: this step's directions (when cached) and the previous step's
        self._z: dict[str, dict[int, torch.Tensor]] = {}
        self._z_prev: dict[str, dict[int, torch.Tensor]] = {}
        self._applying: UpdateRecord | None = None
        self._unapplied: set[str] = set()
        self.device = offload.device if offload is not None else self.params[0].param.device
        self._fused = kernels.fused_for(torch.empty(0, device=self.device))
        self.pending: UpdateRecord | None = None
        self.step_count = 0
        # Offloaded blocks build one stream's shadows at a time: their memory is what limits
        # the model size, and the second read of theta hides behind the PCIe transfers.
        offloaded = {id(b.module) for b in offload.blocks} if offload is not None else set()
        if offload is not None:
            offload.reapply_with(self._reapply)
        self._stream = DualStream(self.units, {p.name: p.param for p in self.params}, self._shadow,
                                  lean=(lambda unit: id(unit.module) in offloaded) if offloaded else None,
                                  batch_streams=batch_streams, shadows=self._unit_shadows)
        self._tables: dict[tuple, Any] = {}  # the grouped launches' tables (kernels' Group), by their tensors
        # Resident fused runs keep each kernel call's launch arguments in device buffers that a
        # step refreshes in place (what a CUDA graph needs):
        # (call, with update, layout, shadow seeds) -> LaunchArgs
        self._launch: dict[tuple, Any] = {}
        self._launch_serial = 0
        if cuda_graphs:
            _check_graphs(self)
            self._stream.graphs = graphs.UnitGraphs(graphs.GraphHooks(
                key=self._graph_key, replayed=self._replayed, snapshot=lambda: set(self._unapplied),
                restore=self._restore_unapplied))

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def step(self, batch: Mapping[str, Any]) -> StepStats:
        """Measure the algorithm's plan at the current weights and queue the update it makes.

        The pending update of the previous step is applied unit by unit as the first
        forward reaches it, in the same pass over the weights that builds the shadows.
        """
        t = self.step_count
        forwards = self.algorithm.plan(t)
        measured: dict[tuple[int, int], float] = {}
        was_training = self.model.training
        if was_training:  # (a model already in eval mode is not walked twice per step)
            self.model.eval()  # no dropout: every stream must see the same function
        self._begin_update(forwards)
        groups = self._groups(parallel.my_probes(self.mesh, forwards))
        probes_measured = sum(len(group) for group in groups)
        try:
            for group in groups:
                probes = tuple(forwards[i].probes[k] for i, k in group)
                self._refresh_launch_args(probes)
                tensors = self._loss_tensors(batch, probes)
                measured.update(zip(group, _scalars(tensors)))
                if self.first_order is not None:  # the FO loss: the mean over the step's probes
                    self.first_order.backward(tensors, 1.0 / probes_measured)
                del tensors
                self._finish_update()
        finally:
            if was_training:
                self.model.train()
        self._finish_update()  # a rank that measured no probe still applies the update
        if self.offload is not None:
            self.offload.after_step()
        shape = [len(f.probes) for f in forwards]
        losses = parallel.assemble(self.mesh, measured, shape, self._shard_weight(batch))
        done = self.algorithm.finish(t, losses)
        if self.first_order is not None:
            self.first_order.step(done.finite)
        update = done.update
        stats = StepStats(t, done.loss, done.projected_grads, list(update.seeds), update.lr, losses, update=update,
                          log=done.log)
        if done.finite:
            self.pending = update
        else:
            warnings.warn(f"step {t}: non-finite loss ({losses}); the update is skipped", stacklevel=2)
            stats.skipped = True
            self._z.clear()
        self.step_count += 1
        return stats

    def _groups(self, mine: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        """The forwards this rank runs: the plan's own, or, offloaded, all of a step's probes in
        one, so each block comes up once per step however many probes the step has."""
        mine = [group for group in mine if group]
        if self.offload is not None or self.merge_forwards:
            return [[probe for group in mine for probe in group]] if mine else []
        return mine

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending update, if any, to the weights (before eval, save or replay)."""
        self._begin_update([])
        self._finish_update()
        if self.offload is not None:
            self.offload.synchronize()  # the host copies are what eval and save read

    def _begin_update(self, forwards: list[algorithms.Forward]) -> None:
        # before anything moves: a masking algorithm reads its thresholds from the step-0 weights
        self._thresholds = algorithms.thresholds(self.algorithm, self._weights)
        self._applying, self.pending = self.pending, None
        self._unapplied = {p.name for p in self.params} if self._applying else set()
        self._z_prev, self._z = self._z, {}
        seeds = {s for f in forwards for s in f.seeds}
        self.cache_directions = self._numel * 4 * len(seeds) <= self.cache_bytes

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
        self._z_prev = {}

    def _apply_pending(self, p: TrainableParam) -> None:
        self._unapplied.discard(p.name)
        u = self._applying
        measured = self._z_prev.pop(p.name, {})
        # last step's z's serve when they are all of the update's directions (MeZO's are;
        # a momentum update also moves along older ones, which are regenerated)
        cached = [measured[s] for s in u.seeds] if all(s in measured for s in u.seeds) else None
        self._apply(p, u, cached)
        if self.offload is not None:
            self.offload.updated(p.param, u)

    def _reapply(self, param: torch.Tensor, record: UpdateRecord) -> None:
        """Apply a past update again (to a block whose host copy lacks it; distzo.offload)."""
        self._apply(self._by_id[id(param)], record)

    def _apply(self, p: TrainableParam, record: UpdateRecord, cached: list[torch.Tensor] | None = None) -> None:
        apply_record(p.param, p.key, record, self.perturbation, self._fused, cached, self._thresholds.get(p.name))

    def state_dict(self) -> dict[str, Any]:
        """JSON values; a hybrid run's AdamW tensors are ``first_order.tensors()``, saved beside it."""
        pending = None if self.pending is None else records.state_fields(self.pending)
        fo = {} if self.first_order is None else {"first_order": self.first_order.state_dict()}
        return {
            "step": self.step_count,
            "algorithm": self.algorithm.name,
            **self.algorithm.state_dict(),
            "perturbation": self.perturbation,
            "pending": pending,
            **fo,
        }

    def load_state_dict(self, state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """``tensors``: the first-order state's (a hybrid run needs them, and its JSON part)."""
        state = current_state(state)
        if self.first_order is not None:
            if "first_order" not in state or tensors is None:
                raise ValueError("the saved state has no first-order (AdamW) state, but this run trains "
                                 "optim.first_order parameters by backprop")
            self.first_order.load_state_dict(state["first_order"], dict(tensors))
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

    def stream_losses(self, batch: Mapping[str, Any], probes: tuple[algorithms.Probe, ...]) -> list[float]:
        """L(theta + a z(s)) for each probe (s, a), from one forward of the batch stacked once per probe."""
        self._refresh_launch_args(probes)
        return _scalars(self._loss_tensors(batch, probes))

    def _loss_tensors(self, batch: Mapping[str, Any], probes: tuple[algorithms.Probe, ...]) -> list[torch.Tensor]:
        """The loss of each probe's stream, as tensors: in a hybrid run, those downstream of an FO
        parameter carry the graph its backward needs."""
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and v is not None}
        rows, parts = _rows(inputs), len(probes)
        device = self.device
        stacked = {k: torch.cat([v] * parts).to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        recording = self.first_order.recording() if self.first_order is not None else contextlib.nullcontext()
        with recording:  # the loss too: it is part of the FO graph
            with self._stream.active(rows, probes):
                outputs = self.model(**stacked, use_cache=False)
            return [self.loss_fn(split_rows(outputs, rows, part, parts), batch) for part in range(parts)]

    def _direction_of(self, p: TrainableParam, seed: int) -> torch.Tensor:
        cache = self._z.setdefault(p.name, {})
        z = cache.get(seed)
        if z is None:
            z = directions.direction_like(p.param, seed, p.key, self.perturbation)
            if self.cache_directions:
                cache[seed] = z
        return z

    def _shadow(self, name: str, param: torch.Tensor, probes: tuple[algorithms.Probe, ...]) -> tuple[torch.Tensor, ...]:
        """theta + a z(s) for each probe (s, a), in the parameter's dtype; theta itself is never
        written (a probe of scale 0 reads it as it is). The pending update is applied first."""
        return self._outside_graph(lambda: {name: self._shadows(name, param, probes)})[name]

    def _outside_graph(self, build: Callable[[], dict[str, tuple]]) -> dict[str, tuple]:
        """``build()``'s shadows, kept out of a hybrid forward's autograd graph."""
        if self.first_order is None:  # step() runs under no_grad: nothing records a graph
            return build()
        # a hybrid forward records a graph: ZO weights are never in it, and a probe of scale 0
        # reads theta, detached so that the graph does not reach it
        with torch.no_grad():
            return {name: tuple(s.detach() for s in shadows) for name, shadows in build().items()}

    def _shadows(self, name: str, param: torch.Tensor,
                 probes: tuple[algorithms.Probe, ...]) -> tuple[torch.Tensor, ...]:
        p = self._by_name[name]
        threshold = self._thresholds.get(name)
        if self._fused is None:
            if p.name in self._unapplied:
                self._apply_pending(p)
            return tuple(perturbed(param, self._direction_of(p, pr.seed), pr.scale, threshold) if pr.scale else param
                         for pr in probes)
        update = self._applying if p.name in self._unapplied else None
        return self._fused_shadows([p], update, probes, threshold, lambda u, launch, args: [
            self._fused.update_and_shadows_of(param, p.key, u, self.perturbation, launch.seeds, launch.scales,
                                              threshold, args=args)])[name]

    def _fused_shadows(self, params: list[TrainableParam], update: UpdateRecord | None,
                       probes: tuple[algorithms.Probe, ...], threshold: float | None,
                       build: Callable) -> dict[str, tuple[torch.Tensor, ...]]:
        """The shadows of ``params`` for ``probes`` from the fused kernels, the pending ``update``
        applied first. ``build(update, launch, args)`` makes one kernel call's shadows: for each
        parameter, a (plus, minus) pair per seed of the ``_Launch``."""
        self._unapplied.difference_update(p.name for p in params)
        out = {p.name: [p.param if pr.scale == 0.0 else None for pr in probes] for p in params}
        # The kernel applies the update and builds the shadows of up to MAX_SHADOW_SEEDS seeds
        # (two each) in one pass over theta; seeds with another number of shadows, or beyond
        # that many, take further passes, without the update.
        for j, launch in enumerate(_launches(probes, self._fused.MAX_SHADOW_SEEDS)):
            built = build(update, launch, self._launch_args(j, update, len(launch.seeds)))
            for p, shadows in zip(params, built):
                for slots, pair in zip(launch.slots, shadows):
                    for k, shadow in zip(slots, pair):
                        out[p.name][k] = shadow
            self._updated(params, update)
            update = None
        if update is not None:  # every probe reads theta: the update alone
            for p in params:
                self._fused.apply_update(p.param, p.key, update, self.perturbation, threshold,
                                         args=self._launch_args("update", update))
            self._updated(params, update)
        return {name: tuple(shadows) for name, shadows in out.items()}

    def _updated(self, params: list[TrainableParam], update: UpdateRecord | None) -> None:
        if update is not None and self.offload is not None:
            for p in params:
                self.offload.updated(p.param, update)

    def _unit_shadows(self, names: list[str], probes: tuple[algorithms.Probe, ...]) -> dict[str, tuple]:
        """``_shadow`` of each of a unit call's parameters, the small ones of each dtype (and of the
        same pending update) built in one kernel launch (``fused.Group``), the others one launch each.
        Only resident fused runs group (offloaded blocks report each tensor's update to the engine)."""
        if self._fused is None or self.offload is not None:
            return {name: self._shadow(name, self._by_name[name].param, probes) for name in names}
        out, together = {}, {}
        for name in names:
            p = self._by_name[name]
            update = self._applying if name in self._unapplied else None
            if name not in self._thresholds and self._fused.groupable(p.param, update):
                together.setdefault((p.param.dtype, update is not None), []).append(p)
            else:
                out[name] = self._shadow(name, p.param, probes)
        most = self._fused.MAX_GROUP
        for (_, updating), found in together.items():
            for chunk in (found[i:i + most] for i in range(0, len(found), most)):
                if len(chunk) == 1:
                    out[chunk[0].name] = self._shadow(chunk[0].name, chunk[0].param, probes)
                    continue
                update = self._applying if updating else None
                out.update(self._outside_graph(lambda: self._grouped_shadows(chunk, update, probes)))
        return out

    def _grouped_shadows(self, params: list[TrainableParam], update: UpdateRecord | None,
                         probes: tuple[algorithms.Probe, ...]) -> dict[str, tuple]:
        """``_shadows`` of several small tensors in one launch per kernel call."""
        ident = tuple((p.name, p.param.data_ptr()) for p in params)
        group = self._tables.get(ident)
        if group is None:
            group = self._tables[ident] = self._fused.Group([p.param for p in params], [p.key for p in params],
                                                            [decays(p.param) for p in params])
        return self._fused_shadows(params, update, probes, None, lambda u, launch, args: (
            self._fused.update_and_shadows_grouped(group, u, self.perturbation, launch.seeds, launch.scales,
                                                   args=args)))

    # ------------------------------------------------------------------ launch arguments, CUDA graphs

    @property
    def _keeps_launch_args(self) -> bool:
        return self._fused is not None and self.offload is None

    def _refresh_launch_args(self, probes: tuple[algorithms.Probe, ...]) -> None:
        """Write this forward's seeds, coefficients and scales into the kept launch arguments of
        every kernel call it will make (before the forward: a captured call only reads them)."""
        if not self._keeps_launch_args:
            return
        self._launch_serial += 1
        update = self._applying
        for j, launch in enumerate(_launches(probes, self._fused.MAX_SHADOW_SEEDS)):
            self._keep(j, None, launch.seeds, launch.scales)
            if update is not None and j == 0:
                self._keep(j, update, launch.seeds, launch.scales)
        if update is not None:
            self._keep("update", update, (0,), ((0.0, 0.0),))

    def _launch_key(self, call, record: UpdateRecord | None, seeds: int = 1) -> tuple:
        return call, record is not None, self._fused.layout_of(record, self.perturbation), seeds

    def _keep(self, call, record: UpdateRecord | None, seeds: tuple[int, ...],
              scales: tuple[tuple[float, float], ...]) -> None:
        key = self._launch_key(call, record, len(seeds))
        kept = self._launch.get(key)
        if kept is None:
            kept = self._launch[key] = self._fused.LaunchArgs(record, self.perturbation, seeds, scales, self.device)
        else:
            kept.refresh(record, self.perturbation, seeds, scales)
        kept.serial = self._launch_serial

    def _launch_args(self, call, record: UpdateRecord | None, seeds: int = 1):
        """The kept launch arguments of kernel call ``call`` (of ``seeds`` shadow seeds) of this
        forward (None: not kept; the kernels then make their own)."""
        if not self._keeps_launch_args:
            return None
        kept = self._launch.get(self._launch_key(call, record, seeds))
        if kept is not None and kept.serial == self._launch_serial:
            return kept
        if torch.cuda.is_current_stream_capturing():  # a capture must not bake in a step's values
            raise RuntimeError(f"no launch arguments were kept for kernel call {call!r} of this forward")
        return None

    def _graph_key(self, unit) -> tuple | None:
        """What decides the launches of a unit call beside its inputs: which of its parameters
        take the pending update (and the record's layout), the probes' structure, the masks.
        None keeps the call eager (a record or a dtype the torch path serves)."""
        names = tuple(sorted({name for _, _, name in unit.slots}))
        updating = tuple(n for n in names if n in self._unapplied)
        record = self._applying if updating else None
        if any(self._fused.torch_path(self._by_name[n].param, record) for n in names):
            return None
        probes = self._stream.probes
        seeds = [pr.seed for pr in probes]
        shape = tuple((pr.scale != 0.0, seeds.index(pr.seed)) for pr in probes)
        layout = self._fused.layout_of(record, self.perturbation)
        return updating, layout, shape, tuple(self._thresholds.get(n) for n in names)

    def _replayed(self, unit) -> None:
        """A replayed unit call did what its shadow calls do to the bookkeeping."""
        for _, _, name in unit.slots:
            self._unapplied.discard(name)

    def _restore_unapplied(self, state: set[str]) -> None:
        self._unapplied = set(state)


def _check_first_order(first_order: FirstOrder | None, mesh: parallel.Mesh | None,
                       offload: OffloadEngine | None) -> None:
    if first_order is None:
        return
    if mesh is not None and mesh.distributed:
        # the FO gradients would need an all-reduce over the data ranks and agreement over pert/dir
        raise ValueError("optim.first_order does not work under torchrun yet; run a hybrid job in one process")
    if offload is not None:
        check_offload(first_order.model, first_order, offload)


def _check_graphs(opt: ZOOptimizer) -> None:
    """CUDA graphs replay resident fused launches; say so where a run has none to replay."""
    if opt._fused is None:
        raise ValueError("optim.cuda_graphs needs a CUDA device with Triton (the fused kernels); this run has none")
    if opt.offload is not None:
        raise ValueError("optim.cuda_graphs does not combine with offload: the blocks' uploads are timed by the host")
    if opt.first_order is not None:
        raise ValueError("optim.cuda_graphs does not combine with optim.first_order (its backward records a graph)")


def _scalars(losses: list[torch.Tensor]) -> list[float]:
    """The streams' losses as floats, read from the device at once: one host sync per forward, not one per stream."""
    return torch.stack([loss.detach().to(torch.float64).mean() for loss in losses]).tolist()


def _check_mesh(algorithm: algorithms.Algorithm, mesh: parallel.Mesh | None) -> None:
    """A pert axis wider than the plan's forwards would leave ranks with nothing to measure."""
    widest = max(len(f.probes) for f in algorithm.plan(0))
    if mesh is not None and mesh.size("pert") > widest:
        raise ValueError(f"parallel.pert {mesh.size('pert')} exceeds the {widest} probes of a {algorithm.name} "
                         "forward: some ranks would measure nothing")


@dataclass(frozen=True)
class _Launch:
    """One fused pass's shadows: its seeds, the streams each seed's (up to two) shadows feed, and
    each seed's (a, b) scales (0.0 where a seed has one shadow)."""

    seeds: tuple[int, ...]
    slots: tuple[tuple[int, ...], ...]
    scales: tuple[tuple[float, float], ...]


@functools.lru_cache(maxsize=16)
def _launches(probes, most: int) -> tuple[_Launch, ...]:
    """The fused passes a unit call makes: the nonzero-scale probes grouped by seed, two shadows a
    seed at a time, and the seeds with the same number of shadows (FZOO's one, ZO-SGD's two) in
    one pass, at most ``most`` seeds a pass, in the order the probes first name them. Cached: a
    forward asks once per parameter tensor, with the same probes."""
    by_seed: dict[int, list[int]] = {}
    for k, probe in enumerate(probes):
        if probe.scale != 0.0:
            by_seed.setdefault(probe.seed, []).append(k)
    calls = [(seed, tuple(slots[i : i + 2])) for seed, slots in by_seed.items() for i in range(0, len(slots), 2)]
    launches = []
    for width in (2, 1):
        same = [(seed, slots) for seed, slots in calls if len(slots) == width]
        for i in range(0, len(same), most):
            chunk = same[i : i + most]
            launches.append(_Launch(tuple(seed for seed, _ in chunk), tuple(slots for _, slots in chunk),
                                    tuple((probes[s[0]].scale, probes[s[1]].scale if width == 2 else 0.0)
                                          for _, s in chunk)))
    return tuple(launches)


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
