"""Hybrid training: a small named subset of the parameters by backprop, the rest by ZO.

    fo = FirstOrder.select(model, ["model.norm.*", "lm_head.*"], lr=1e-4)
    opt = ZOOptimizer(model, first_order=fo)       # ZO perturbs every other trainable parameter

The first-order (FO) parameters are not perturbed: every probe of a ZO step sees them as they
are. Their gradient comes from the ZO step's own stacked forward: autograd is switched on when
the forward reaches the first module that owns an FO parameter, so only what runs from there on
keeps activations. The FO loss is the mean of the loss of every probe the step measures. For
MeZO's two-sided pair that is (L(θ+εz) + L(θ−εz)) / 2 = L(θ) + O(ε²): the gradient at θ up to
O(ε²), at no extra forward. Then AdamW steps the FO parameters.

Patterns are shell-style (``fnmatch``: ``*`` matches any run of characters, dots included) over
the canonical names of ``model.named_parameters()`` (a tied weight under its first name).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from distzo.units import TrainableParam, trainable_params
from distzo.update import FULL_PRECISION

TENSORS_FILE = "first_order.safetensors"
# AdamW's state tensors, per parameter; the file also holds "<name>/master", the float32 copy a
# bf16/fp16 parameter is stepped in.
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def match(model: nn.Module, patterns: Sequence[str]) -> list[TrainableParam]:
    """The trainable parameters whose names match a pattern; ValueError (one line) when a pattern
    matches none of them, or the patterns leave ZO nothing to train."""
    params = trainable_params(model)
    names = [p.name for p in params]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"optim.first_order: pattern {pattern!r} matches no trainable parameter (the names are "
                             f"those of model.named_parameters(), e.g. {names[-1]!r})")
    chosen = [p for p in params if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]
    if len(chosen) == len(params):
        raise ValueError(f"optim.first_order: {','.join(patterns)} matches every trainable parameter; "
                         "leave some to the zeroth-order algorithm (or train by backprop with another tool)")
    return chosen


class FirstOrder:
    """AdamW on the FO parameters, fed by the ZO step's forwards (see the module docstring)."""

    def __init__(self, model: nn.Module, params: list[TrainableParam], patterns: Sequence[str],
                 lr: float = 1e-4, weight_decay: float = 0.0):
        self.model, self.params, self.patterns = model, params, list(patterns)
        # A bf16/fp16 parameter is stepped in a float32 master copy: rounding each AdamW step
        # (lr ~1e-4, about a bf16 ulp of 1/100) to the nearest bf16 would erase most of them.
        self.masters = [p.param if p.param.dtype in FULL_PRECISION else p.param.detach().float().clone()
                        for p in params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay)
        self._owners = _owners(model, {id(p.param) for p in params})

    @classmethod
    def select(cls, model: nn.Module, patterns: Sequence[str], **settings: Any) -> FirstOrder:
        return cls(model, match(model, patterns), patterns, **settings)

    @property
    def ids(self) -> set[int]:
        return {id(p.param) for p in self.params}

    # ------------------------------------------------------------------ the step

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Autograd off until the forward enters a module that owns an FO parameter, on from there:
        what runs before keeps no activations and its outputs are leaves. Wrap one model call."""
        def switch_on(module, args):
            torch.set_grad_enabled(True)

        hooks = [m.register_forward_pre_hook(switch_on) for m in self._owners]
        try:
            with torch.no_grad():  # restores the mode the caller had when the forward ends
                yield
        finally:
            for h in hooks:
                h.remove()

    def backward(self, losses: Sequence[torch.Tensor], weight: float) -> None:
        """Accumulate ``weight`` times the gradient of the sum of ``losses`` (one per stream)."""
        with torch.enable_grad():
            total = sum(loss.mean() for loss in losses) * weight
            if total.requires_grad:  # an FO parameter the batch never reaches has no gradient
                total.backward()

    def step(self, finite: bool) -> None:
        """AdamW on the accumulated gradient; a step whose loss was not finite changes nothing."""
        if finite:
            for p, master in zip(self.params, self.masters):
                if master is not p.param and p.param.grad is not None:
                    master.grad = p.param.grad.float()
            self.optimizer.step()
            with torch.no_grad():
                for p, master in zip(self.params, self.masters):
                    if master is not p.param:
                        p.param.copy_(master)
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.param.grad = None

    # ------------------------------------------------------------------ memory

    def extra_bytes(self) -> int:
        """Bytes this adds beside the model, activations aside: per FO parameter its gradient and
        AdamW's two moments (and for bf16/fp16 a float32 master copy and its gradient)."""
        total = 0
        for p, master in zip(self.params, self.masters):
            total += p.param.numel() * p.param.element_size()  # the gradient
            total += 2 * master.numel() * master.element_size()  # exp_avg, exp_avg_sq
            if master is not p.param:
                total += 2 * master.numel() * master.element_size()  # the master and its gradient
        return total

    def numel(self) -> int:
        return sum(p.param.numel() for p in self.params)

    def describe(self) -> str:
        return (f"first order: {len(self.params)} tensors, {self.numel():,} parameters ({','.join(self.patterns)}) "
                f"by AdamW; {self.extra_bytes() / 2**20:.1f} MiB for gradients and moments, plus the activations "
                "from the first of their modules on")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The JSON part of the state (settings); the tensors are ``tensors()``."""
        group = self.optimizer.param_groups[0]
        settings = {k: v for k, v in group.items() if k != "params"}
        return {"patterns": self.patterns, "names": [p.name for p in self.params],
                "group": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}

    def tensors(self) -> dict[str, torch.Tensor]:
        """AdamW's state (and the masters) by parameter name, for a safetensors file."""
        out: dict[str, torch.Tensor] = {}
        for p, master in zip(self.params, self.masters):
            for key, value in self.optimizer.state.get(master, {}).items():
                out[f"{p.name}/{key}"] = value.detach().cpu().contiguous()
            if master is not p.param:
                out[f"{p.name}/master"] = master.detach().cpu().contiguous()
        return out

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        names = [p.name for p in self.params]
        if state.get("names") != names:
            raise ValueError(f"the checkpoint's first-order parameters {state.get('names')} are not this run's {names}")
        group = self.optimizer.param_groups[0]
        for k, v in state["group"].items():
            group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                if master is not p.param:
                    master.copy_(tensors[f"{p.name}/master"])
                kept = {k: tensors[f"{p.name}/{k}"] for k in STATE_KEYS if f"{p.name}/{k}" in tensors}
                if kept:
                    self.optimizer.state[master] = {k: _placed(v, k, master) for k, v in kept.items()}


def read_tensors(checkpoint: Path) -> dict[str, torch.Tensor] | None:
    """The first-order state tensors a checkpoint holds; None when it holds none."""
    path = checkpoint / TENSORS_FILE
    return load_file(path) if path.is_file() else None


def _placed(value: torch.Tensor, key: str, master: torch.Tensor) -> torch.Tensor:
    # AdamW keeps its step count on the CPU (unless capturable) and the moments beside the parameter.
    return value.clone() if key == "step" else value.to(master.device).clone()


def _owners(model: nn.Module, ids: set[int]) -> list[nn.Module]:
    """The modules that own an FO parameter directly (as their own attribute)."""
    return [m for m in model.modules() if any(p is not None and id(p) in ids for p in m._parameters.values())]


def check_offload(model: nn.Module, fo: FirstOrder, engine) -> None:
    """Offloaded, an FO parameter must be resident and come after every streamed block: a gradient
    that flowed back through a block would need its weights on the GPU again after they left."""
    order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    # the blocks' modules, not their host entries: a quantized block's adapters are resident, yet a
    # gradient reaching them would still flow back through the block's offloaded base
    streamed = {id(p) for b in engine.blocks for p in b.module.parameters()}
    last = max(order[i] for i in streamed)
    for p in fo.params:
        if id(p.param) in streamed:
            raise ValueError(f"optim.first_order: {p.name} lives in an offloaded block; with offload, train by "
                             "backprop only resident parameters after the blocks (final norm, head)")
        if order[id(p.param)] < last:
            raise ValueError(f"optim.first_order: {p.name} comes before the offloaded blocks, so its gradient would "
                             "flow back through them; with offload, choose parameters after the blocks (final norm, "
                             "head)")
