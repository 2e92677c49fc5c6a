"""Split any Hugging Face model into perturbable units, and evaluate both losses in one forward.

A *unit* is a module whose parameters are perturbed together: every block of the
model's layer list, and every other module that owns trainable parameters directly
(embeddings, position embeddings, final norm, head, projections). The units cover
every trainable parameter, and no unit contains another.

During a K-stream forward the model runs once on the batch stacked K times (K*R rows),
one stream per probe (seed s_k, scale a_k). Each unit's ``forward`` is replaced, on that
instance only and only for the duration, by a wrapper that splits its inputs by rows, runs
the original forward on rows [kR, (k+1)R) with the shadow weights theta + a_k z(s_k), and
concatenates the results. MeZO's pair is K = 2 (theta + eps z, theta - eps z); a rank that
measures one probe of the pair runs K = 1. theta itself is never written. The model
family's own forward code runs unchanged, so no family needs code of its own.

With ``batch_streams`` a unit whose perturbed parameters all belong to linear, embedding or norm
layers inside it runs its forward once over all K*R rows instead, and only those layers split
their rows by stream (``batchable``): LoRA's frozen base then computes once per forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from distzo.directions import stable_key


class UnsupportedModel(RuntimeError):
    """The model uses a trainable parameter in a way the unit wrappers cannot perturb."""


@dataclass
class Unit:
    """A module whose trainable parameters are perturbed as one."""

    name: str
    module: nn.Module
    # (owning submodule, attribute name, canonical parameter name) for each trainable slot;
    # a tied parameter appears in every unit that uses it, under one canonical name.
    slots: list[tuple[nn.Module, str, str]] = field(default_factory=list)


@dataclass
class TrainableParam:
    name: str  # canonical name (first in named_parameters order)
    param: nn.Parameter
    key: int  # 64-bit direction key, derived from the name


def trainable_params(model: nn.Module) -> list[TrainableParam]:
    """The parameters ZO perturbs: those with requires_grad, each once (tied ones share)."""
    found = [TrainableParam(n, p, stable_key(n)) for n, p in model.named_parameters() if p.requires_grad]
    if not found:
        raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to optimise")
    return found


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(name, list) of every ModuleList of identical blocks: the model's layer stacks."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    ]


def _layer_lists(model: nn.Module) -> set[int]:
    return {id(stack) for _, stack in layer_stacks(model)}


def find_units(model: nn.Module, params: list[TrainableParam]) -> list[Unit]:
    """Partition the model into units covering every trainable parameter."""
    canonical = {id(p.param): p.name for p in params}
    stacks = _layer_lists(model)
    units: list[Unit] = []

    def has_trainable(module: nn.Module) -> bool:
        return any(id(p) in canonical for p in module.parameters(recurse=True))

    def owns_trainable(module: nn.Module) -> bool:
        return any(p is not None and id(p) in canonical for p in module._parameters.values())

    def visit(module: nn.Module, prefix: str, is_block: bool) -> None:
        if not has_trainable(module):
            return
        if is_block or owns_trainable(module):
            units.append(Unit(prefix, module, _slots(module, canonical)))
            return
        is_stack = id(module) in stacks
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name, is_stack)

    visit(model, "", False)
    covered = {name for u in units for _, _, name in u.slots}
    missing = [p.name for p in params if p.name not in covered]
    if missing:  # cannot happen by construction; guards against future edits
        raise RuntimeError(f"parameters not covered by any unit: {missing[:5]}")
    return units


def _slots(unit: nn.Module, canonical: dict[int, str]) -> list[tuple[nn.Module, str, str]]:
    slots = []
    for sub in unit.modules():
        for attr, p in sub._parameters.items():
            if p is not None and id(p) in canonical:
                slots.append((sub, attr, canonical[id(p)]))
    return slots


# ---------------------------------------------------------------- batch splitting


def split_rows(obj, rows: int, part: int, parts: int = 2):
    """Rows [part*rows, (part+1)*rows) of every batch-shaped tensor (parts*rows leading rows)."""
    if isinstance(obj, torch.Tensor):
        if obj.ndim >= 2 and obj.shape[0] == parts * rows:
            return obj[part * rows : (part + 1) * rows]
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(split_rows(o, rows, part, parts) for o in obj)
    if isinstance(obj, list):
        return [split_rows(o, rows, part, parts) for o in obj]
    if isinstance(obj, dict):
        items = {k: split_rows(v, rows, part, parts) for k, v in obj.items()}
        return type(obj)(**items) if _is_model_output(obj) else items
    return obj


def _is_model_output(obj) -> bool:
    return type(obj).__name__.endswith("Output") or hasattr(obj, "to_tuple")


def _has_batch(obj, rows: int, parts: int) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.ndim >= 2 and obj.shape[0] == parts * rows
    if isinstance(obj, (tuple, list)):
        return any(_has_batch(o, rows, parts) for o in obj)
    if isinstance(obj, dict):
        return any(_has_batch(v, rows, parts) for v in obj.values())
    return False


def _merge(outs: list, rows: int, unit_name: str):
    """Stack the streams' outputs back into K*R rows."""
    a = outs[0]
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        if a.ndim >= 1 and a.shape[0] == rows:
            return torch.cat(outs, dim=0) if len(outs) > 1 else a
        if a.ndim >= 2 and a.shape[0] == 1:  # broadcast output (e.g. positions of shape (1, S))
            return torch.cat([o.expand(rows, *o.shape[1:]) for o in outs], dim=0)
        raise UnsupportedModel(
            f"unit '{unit_name}' returned a tensor of shape {tuple(a.shape)} without a batch dimension; "
            "distzo cannot tell its perturbed streams apart"
        )
    if isinstance(a, tuple) and not hasattr(a, "_fields"):
        return tuple(_merge(list(xs), rows, unit_name) for xs in zip(*outs))
    if isinstance(a, list):
        return [_merge(list(xs), rows, unit_name) for xs in zip(*outs)]
    if isinstance(a, dict):
        merged = {k: _merge([o[k] for o in outs], rows, unit_name) for k in a}
        return type(a)(**merged) if _is_model_output(a) else merged
    if all(o == a for o in outs):
        return a
    raise UnsupportedModel(f"unit '{unit_name}' returned {type(a).__name__} values that differ between streams")


# ---------------------------------------------------------------- multi-stream forward


# shadow(name, param, probes) -> (theta + a_0 z(s_0), theta + a_1 z(s_1), ...) for probes (s_k, a_k)
ShadowFn = Callable[[str, torch.Tensor, tuple], tuple[torch.Tensor, ...]]
# shadows(names, probes) -> {name: shadow(name, ...)} for the parameters of one unit call at once
ShadowsFn = Callable[[list[str], tuple], dict[str, tuple[torch.Tensor, ...]]]


@contextlib.contextmanager
def _swapped(slots: list[tuple[nn.Module, str, str]], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily let each slot read a shadow tensor instead of its parameter."""
    saved = [(sub, attr, sub._parameters[attr]) for sub, attr, _ in slots]
    try:
        for sub, attr, name in slots:
            sub._parameters[attr] = values[name]
        yield
    finally:
        for sub, attr, p in saved:
            sub._parameters[attr] = p


class DualStream:
    """Installs the row-splitting wrappers on every unit while active.

    ``shadow(name, param, probes)`` returns the shadows theta + a*z(s), one per stream's
    probe (seed s, scale a; ``distzo.algorithms.Probe``), of a canonical parameter name. It
    is called once per parameter and unit call, so an engine decides where z comes from
    (regenerated, cached, or a fused kernel); at most one unit's shadows are alive at a time.
    ``shadows(names, probes)``, if given, builds those of a unit call's parameters at once (one
    kernel launch for many small tensors) instead.
    """

    def __init__(self, units: list[Unit], params: dict[str, torch.Tensor], shadow: ShadowFn,
                 lean: Callable[[Unit], bool] | None = None, batch_streams: bool = False,
                 shadows: ShadowsFn | None = None):
        self.units, self.params, self.shadow, self.shadows = units, params, shadow, shadows
        # A lean unit builds one stream's shadows at a time (shadow() is then called once per
        # stream with that stream's probe): 1/K of the shadow memory, K-1 more reads of theta.
        self.lean = lean
        # Units whose calls run once over all K*R rows, only the modules owning perturbed
        # parameters stream by stream (batchable()); the others run whole, stream by stream.
        self.batched = {u.name for u in units if batchable(u)} if batch_streams else set()
        self.rows = 0
        self.probes: tuple = ()
        self.calls: dict[str, int] = {}
        # distzo.graphs.UnitGraphs: unit calls replayed from CUDA graphs; None runs them eagerly
        self.graphs = None

    @contextlib.contextmanager
    def active(self, rows: int, probes: tuple) -> Iterator[None]:
        self.rows, self.probes = rows, tuple(probes)
        self.calls = {u.name: 0 for u in self.units}
        if self.graphs is not None:
            self.graphs.begin_forward()
        try:
            for unit in self.units:
                unit.module.forward = self._wrap(unit)
            yield
        finally:
            for unit in self.units:
                unit.module.__dict__.pop("forward", None)
        never = [name for name, n in self.calls.items() if n == 0]
        if never:
            raise UnsupportedModel(
                f"the forward never called unit(s) {never[:3]}: their parameters are used outside their own "
                "forward, so distzo cannot perturb them per half. Freeze them (requires_grad=False) or use LoRA."
            )

    def _wrap(self, unit: Unit) -> Callable:
        original = type(unit.module).forward.__get__(unit.module)

        def forward(*args, **kwargs):
            index = self.calls[unit.name]
            self.calls[unit.name] += 1
            if self.graphs is not None:
                return self.graphs.call(unit, index, streams, args, kwargs)
            return streams(args, kwargs)

        def streams(args: tuple, kwargs: dict):
            """The unit call itself: shadows, one original forward per stream, the merge; or, batched,
            one original forward over every stream's rows with its perturbed layers per stream."""
            lean = self.lean is not None and self.lean(unit)
            if unit.name in self.batched and len(self.probes) > 1 and _has_batch((args, kwargs), self.rows,
                                                                                  len(self.probes)):
                with self._owners_per_stream(unit, lean, _tokens((args, kwargs), self.rows * len(self.probes))):
                    return original(*args, **kwargs)
            return self._per_stream(unit.name, original, unit.slots, lean, args, kwargs, self.rows)

        return forward

    def _per_stream(self, unit_name: str, forward: Callable, slots: list[tuple[nn.Module, str, str]], lean: bool,
                    args: tuple, kwargs: dict, rows: int):
        """``forward`` once per stream on that stream's ``rows`` rows, with the stream's shadows in ``slots``."""
        parts = len(self.probes)
        names = sorted({name for _, _, name in slots})
        shadows = {} if lean else self._shadows_of(names)
        split = parts > 1 and _has_batch((args, kwargs), rows, parts)
        outs = []
        for part in range(parts):
            a, k = (split_rows(args, rows, part, parts), split_rows(kwargs, rows, part, parts)) if split else (
                args,
                kwargs,
            )
            if lean:
                current = {n: self.shadow(n, self.params[n], (self.probes[part],))[0] for n in names}
            else:
                current = {n: pair[part] for n, pair in shadows.items()}
            with _swapped(slots, current):
                outs.append(forward(*a, **k))
            del current
        del shadows
        return _merge(outs, rows, unit_name)

    def _shadows_of(self, names: list[str]) -> dict[str, tuple[torch.Tensor, ...]]:
        if self.shadows is not None:
            return self.shadows(names, self.probes)
        return {n: self.shadow(n, self.params[n], self.probes) for n in names}

    @contextlib.contextmanager
    def _owners_per_stream(self, unit: Unit, lean: bool, tokens: int) -> Iterator[None]:
        """While a batched unit call runs: each module owning its perturbed parameters runs stream by
        stream, everything else once over all streams' rows (for LoRA: the base's products once).
        ``tokens``: the rows of the call's inputs flattened to tokens, which some blocks hand their
        layers (OPT's MLP); 0 if the call's inputs have no sequence dimension."""
        owners: dict[int, tuple[nn.Module, list]] = {}
        for slot in unit.slots:
            owners.setdefault(id(slot[0]), (slot[0], []))[1].append(slot)
        saved = []
        try:
            for sub, slots in owners.values():
                saved.append((sub, sub.__dict__.get("forward")))
                sub.forward = self._owner_forward(unit, sub, slots, lean, tokens)
            yield
        finally:
            for sub, own in saved:
                if own is None:
                    sub.__dict__.pop("forward", None)
                else:
                    sub.forward = own

    def _owner_forward(self, unit: Unit, sub: nn.Module, slots: list, lean: bool, tokens: int) -> Callable:
        own = sub.__dict__.get("forward") or type(sub).forward.__get__(sub)
        parts = len(self.probes)

        def forward(*args, **kwargs):
            # the streams' rows, batch-major or flattened to tokens: each stream's part is contiguous
            for rows in (self.rows, tokens // parts):
                if rows and _has_batch((args, kwargs), rows, parts):
                    return self._per_stream(unit.name, own, slots, lean, args, kwargs, rows)
            raise UnsupportedModel(
                f"optim.batch_streams: a layer of unit '{unit.name}' ({type(sub).__name__}) was called on inputs "
                "without the streams' rows or tokens as their first dimension; run without optim.batch_streams")

        return forward


def _tokens(obj, rows: int) -> int:
    """rows * S for the first input of ``rows`` rows and a sequence dimension S (hidden states)."""
    if isinstance(obj, torch.Tensor):
        return rows * obj.shape[1] if obj.ndim >= 3 and obj.shape[0] == rows else 0
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for value in values:
        found = _tokens(value, rows)
        if found:
            return found
    return 0


# Modules that read their parameters in their own forward alone, so a batched unit call can give
# them a stream's shadows for that stream's rows: torch's linear, embedding and norm layers, and
# the RMSNorm layers of the model families (a class of that name holding only a weight). Other
# owners (a DoRA magnitude whose weight norm reads the adapters' weights, experts holding stacked
# weights) may be read from outside their forward, so their units run whole, stream by stream.
_READS_OWN = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)


def _reads_own(module: nn.Module) -> bool:
    if isinstance(module, _READS_OWN):
        return True
    return type(module).__name__.endswith("RMSNorm") and set(module._parameters) == {"weight"}


def batchable(unit: Unit) -> bool:
    """Whether ``unit``'s calls can run once over all streams' rows (optim.batch_streams): every
    module owning its perturbed parameters is a strict submodule that reads them in its own forward."""
    return all(sub is not unit.module and _reads_own(sub) for sub, _, _ in unit.slots)
