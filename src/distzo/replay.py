"""Rebuild fine-tuned weights from the base model and the trajectory log.

A step's whole update is (seeds, g's, lr), so base weights + log = the fine-tuned
model. Replay calls the very update function the engines use, in the same order, so
on the same device and dtype it reproduces the checkpoint bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distzo.checkpoint import TrajectoryLog, save_checkpoint
from distzo.models import LoraSettings, ModelConfig, apply_lora, load_model
from distzo.units import trainable_params
from distzo.update import apply_update_


def load_base(base: str, log: TrajectoryLog, device: str = "auto"):
    """The model the logged run started from: base weights, then its LoRA adapters."""
    header = log.header()
    cfg = ModelConfig(name=base, dtype=header.dtype, device=device, revision=header.extra.get("revision"))
    model, tokenizer = load_model(cfg)
    if "lora" in header.extra:
        torch.manual_seed(header.seed)  # the trainer seeds adapter init the same way
        model = apply_lora(model, LoraSettings(**header.extra["lora"]))
    return model, tokenizer


@torch.no_grad()
def replay_into(model, log: TrajectoryLog, upto: int | None = None) -> int:
    """Apply the logged updates (steps <= upto) to ``model`` in place; returns the steps covered."""
    header = log.header()
    params = trainable_params(model)
    covered = 0
    for record in log.read():
        if upto is not None and record["step"] > upto:
            break
        covered = record["step"] + 1
        if record.get("skipped") or not record["grads"]:
            continue
        for p in params:
            apply_update_(p.param, p.key, record["seeds"], record["grads"], record["lr"], header.weight_decay,
                          header.perturbation)
    return covered


def replay(base: str, log_path: str | Path, output: str | Path, upto: int | None = None, device: str = "auto") -> Path:
    if not Path(log_path).is_file():
        raise FileNotFoundError(f"trajectory log '{log_path}' does not exist")
    log = TrajectoryLog(log_path)
    model, tokenizer = load_base(base, log, device)
    steps = replay_into(model, log, upto)
    return save_checkpoint(output, model, tokenizer, {"step": steps, "replayed_from": str(log_path)})
