"""CUDA graphs of the multi-stream forward, one per unit call.

A ZO step of a small model, or of LoRA adapters, is a few milliseconds of GPU work behind
tens of milliseconds of Python: each unit call builds its shadows (one fused launch per
tensor) and runs the family's forward once per stream. ``UnitGraphs`` captures each unit
call (shadows, streams, merge) the second time it sees it and from then on replays it: one
launch for what was hundreds, and the host runs ahead of the GPU.

A capture is keyed by everything that decides what the call launches: the unit, its call
index within the forward, the optimiser's key for it (which parameters take the pending
update, the record's and the probes' structure, the mask thresholds) and the inputs'
shapes, dtypes and strides (plus the values of non-tensor arguments). Every number that
changes from step to step (seeds, coefficients, lr, scales) sits in device buffers the
optimiser refreshes before the forward (``distzo.kernels.triton_ops.LaunchArgs``), so a
replay computes exactly what the uncaptured call would: same kernels, same inputs, same
bits. The first sight of a key runs eagerly (it compiles kernels and warms up the
libraries; capturing then would not run the step's work), the second captures and replays.

The model code between units (embeddings' positions, masks, rotary tables, the loss) stays
eager. Inputs are copied into the capture's own tensors before a replay, unless they are
already there (a unit's output feeding the next unit); captures share one memory pool and
run in one stream, one after another.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

# Leaves a key may hold by value; any other non-tensor argument keeps the call eager.
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)
GRAPHS_PER_UNIT = 8  # distinct captures (shapes, structures) kept per unit call before it stays eager
# torch.cuda.graph's capture_error_mode. "relaxed": CUDA loads a kernel's module lazily, at its first
# launch in the process, and a capture in the stricter modes can fail when that launch is the
# captured one (seen on an H200: a run that failed with "thread_local" passed with "relaxed", and
# with "thread_local" under CUDA_MODULE_LOADING=EAGER). Work on the capturing stream that cannot be
# captured (a host read, a synchronisation) still fails the capture in any mode.
CAPTURE_MODE = "relaxed"


@dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # the capture's input tensors, in flattening order
    output: Any


@dataclass
class GraphHooks:
    """What the optimiser gives the graphs: its key for a unit call (None: keep it eager), the
    bookkeeping the unit's shadow calls do (run after a replay in their place), and a snapshot
    and restore of that bookkeeping around a capture (which runs the Python but not the kernels)."""

    key: Callable[[Any], Hashable | None]
    replayed: Callable[[Any], None]
    snapshot: Callable[[], Any]
    restore: Callable[[Any], None]


@dataclass
class UnitGraphs:
    """The captures of one optimiser's unit calls (``DualStream.graphs``), with what they read and hold."""

    hooks: GraphHooks
    per_unit: int = GRAPHS_PER_UNIT
    captures: dict[Hashable, _Capture | None] = field(default_factory=dict)
    seen: Counter = field(default_factory=Counter)
    replays: int = 0
    pool: Any = None
    broken: str | None = None  # why captures stopped, after one failed
    _per_unit: Counter = field(default_factory=Counter)
    _outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # data_ptr -> a capture's output
    _filled: dict[int, torch.Tensor] = field(default_factory=dict)  # id(capture input) -> what it holds now
    _clones: dict[tuple, torch.Tensor] = field(default_factory=dict)  # this forward's capture inputs

    def begin_forward(self) -> None:
        """A new forward: inputs copied in the last one say nothing about this one's."""
        self._filled.clear()
        self._clones.clear()

    def call(self, unit, index: int, body: Callable[[tuple, dict], Any], args: tuple, kwargs: dict):
        """``body(args, kwargs)``, the unit call, eagerly or from its graph."""
        key = self._key(unit, index, args, kwargs)
        if key is None:
            return body(args, kwargs)
        capture = self.captures.get(key)
        if capture is None:
            self.seen[key] += 1
            if (key in self.captures or self.seen[key] < 2 or self.broken
                    or self._per_unit[(unit.name, index)] >= self.per_unit):
                return body(args, kwargs)  # failed before, first sight, or too many shapes: eager
            capture = self._capture(unit, index, key, body, args, kwargs)
            if capture is None:
                return body(args, kwargs)
        return self._replay(unit, capture, _tensors((args, kwargs)))

    def _key(self, unit, index: int, args: tuple, kwargs: dict) -> Hashable | None:
        mine = self.hooks.key(unit)
        if mine is None:
            return None
        layout = _layout((args, kwargs))
        return None if layout is None else (unit.name, index, mine, layout)

    def _capture(self, unit, index: int, key, body, args, kwargs) -> _Capture | None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        incoming = _tensors((args, kwargs))
        inputs = [self._input_for(t) for t in incoming]
        c_args, c_kwargs = _rebuild((args, kwargs), iter(inputs))
        state = self.hooks.snapshot()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=CAPTURE_MODE):
                output = body(c_args, c_kwargs)
        except Exception as err:  # noqa: BLE001 - anything the unit cannot do under capture
            self.hooks.restore(state)
            self.captures[key] = None
            # a failed capture can leave torch's allocator recording into the pool: no more captures
            self.broken = f"unit '{unit.name}': {type(err).__name__}: {str(err).splitlines()[0]}"
            warnings.warn(f"CUDA graphs are off for the rest of the run: the capture of {self.broken}",
                          stacklevel=3)
            return None
        self.hooks.restore(state)  # the replay that follows does the work, and its bookkeeping
        if _layout(output) is None:
            self.captures[key] = None
            warnings.warn(f"unit '{unit.name}' runs without a CUDA graph: it returns objects a replay cannot "
                          "reproduce", stacklevel=3)
            return None
        capture = self.captures[key] = _Capture(graph, inputs, output)
        self._per_unit[(unit.name, index)] += 1
        for t in _tensors(output):
            self._outputs[t.data_ptr()] = t
        return capture

    def _input_for(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor a capture reads in place of ``t``: another capture's output as it is (it
        stays where it is from replay to replay), else a copy, shared by the captures of one
        forward that get the same tensor (the rotary tables every layer gets)."""
        if self._outputs.get(t.data_ptr()) is t:
            return t
        ident = (t.data_ptr(), t.shape, t.stride(), t.dtype, t._version)
        clone = self._clones.get(ident)
        if clone is None:
            clone = self._clones[ident] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
            clone.copy_(t)
            self._filled[id(clone)] = t
        return clone

    def _replay(self, unit, capture: _Capture, incoming: list[torch.Tensor]):
        for mine, t in zip(capture.inputs, incoming):
            if mine is t or self._filled.get(id(mine)) is t:
                continue
            mine.copy_(t)
            self._filled[id(mine)] = t  # kept alive for the forward, so its address is not reused
        capture.graph.replay()
        self.hooks.replayed(unit)
        self.replays += 1
        return capture.output


def _tensors(tree) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _walk(tree, out.append)
    return out


def _walk(tree, visit) -> None:
    if isinstance(tree, torch.Tensor):
        visit(tree)
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            _walk(item, visit)
    elif isinstance(tree, dict):
        for item in tree.values():
            _walk(item, visit)


def _layout(tree) -> Hashable | None:
    """A hashable description of a call's arguments (tensors by shape, dtype, stride and device;
    plain values by value), or None when it holds something else."""
    if isinstance(tree, torch.Tensor):
        if tree.requires_grad:
            return None
        return ("T", tuple(tree.shape), tree.stride(), tree.dtype, tree.device)
    if isinstance(tree, _PLAIN):
        return ("V", type(tree).__name__, tree)
    if isinstance(tree, (tuple, list)):
        items = [_layout(item) for item in tree]
        return None if any(i is None for i in items) else (type(tree).__name__, tuple(items))
    if isinstance(tree, dict):
        items = [(k, _layout(v)) for k, v in tree.items()]
        if any(not isinstance(k, str) or v is None for k, v in items):
            return None
        return (type(tree).__name__, tuple(items))
    return None


def _rebuild(tree, tensors):
    """``tree`` with its tensors replaced, in flattening order, by those ``tensors`` yields."""
    if isinstance(tree, torch.Tensor):
        return next(tensors)
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(_rebuild(item, tensors) for item in tree)
    if isinstance(tree, tuple):  # a named tuple
        return type(tree)(*(_rebuild(item, tensors) for item in tree))
    if isinstance(tree, list):
        return [_rebuild(item, tensors) for item in tree]
    if isinstance(tree, dict):
        items = {k: _rebuild(v, tensors) for k, v in tree.items()}
        return items if type(tree) is dict else type(tree)(**items)
    return tree
