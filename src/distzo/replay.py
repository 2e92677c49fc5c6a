"""Rebuild fine-tuned weights from the base model and the trajectory log.

A step's whole update is (seeds, g's, lr): an update record (``distzo.records``) once the
header's weight decay joins it, so base weights + log = the fine-tuned
model. Replay calls the very update function the engines use (the fused kernels on a CUDA
device, the torch path elsewhere), in the same order, so on the same versions, device kind
and dtype it reproduces the checkpoint bit for bit.

Replay trusts nothing it is given: the base must be the one the log's header identifies,
the steps must run 0, 1, 2, ... without a gap, and the output folder must not hold
anything a run needs (its checkpoints, its log, the base itself).

    result = replay("facebook/opt-1.3b", "runs/distzo/trajectory.jsonl", "rebuilt/")
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distzo import kernels
from distzo.checkpoint import (
    LEGACY_TRAINER_STATE,
    TRAINER_STATE,
    BaseIdentity,
    TrajectoryHeader,
    TrajectoryLog,
    save_checkpoint,
)
from distzo.environment import describe
from distzo.models import (
    CONVERTED_NAME,
    LoraSettings,
    ModelConfig,
    apply_lora,
    checkpoint_files,
    default_cache_dir,
    load_model,
    recorded_quantize,
    resolve_device,
    resolve_source,
)
from distzo.records import MASK_FIELD, from_log
from distzo.rundir import LOG_FILE as LOG_NAME
from distzo.units import trainable_params
from distzo.update import apply_record


class ReplayWarning(UserWarning):
    """Replay went ahead, but cannot promise something (the CLI prints it as one line)."""


@dataclass(frozen=True)
class Replayed:
    output: Path
    steps: int
    """Steps 0 .. steps - 1 were replayed."""


def replay(base: str, log_path: str | os.PathLike, output: str | os.PathLike, upto: int | None = None,
           device: str = "auto", overwrite: bool = False) -> Replayed:
    """Rebuild the weights after step ``upto`` (default: the last logged) into ``output``.

    Bad input (a base other than the log's, a damaged log, an ``output`` that holds a
    run, a checkpoint of training or the base) is a ValueError or FileExistsError before
    anything is written. ``overwrite`` lets a non-empty ``output`` be replaced.
    """
    log = TrajectoryLog(log_path)
    if not log.path.is_file():
        raise FileNotFoundError(f"trajectory log '{log_path}' does not exist")
    header = log.header()
    check_replayable(header)
    check_output(output, base, log.path, overwrite)
    records = log.read()
    check_steps(records)
    records = records[: _last_to_replay(records, upto) + 1]
    cfg = base_config(base, header, device)
    model, tokenizer = load_base(base, header, device)
    check_base(model, header, base)
    check_environment(header, device)
    replay_into(model, header, records)
    # A quantized base is not merged into (see models.checkpoint_files): the adapter, as the run saves it.
    saved = save_checkpoint(output, model, tokenizer, {"step": len(records), "replayed_from": str(log_path)},
                            merged=cfg.quantize is None, extra_files=checkpoint_files(cfg))
    return Replayed(saved, len(records))


def base_config(base: str, header: TrajectoryHeader, device: str = "auto") -> ModelConfig:
    """How to load the logged run's base: its dtype, revision and quantization, as the header records them."""
    quantized = header.extra.get("quantize")
    # as the run quantized it, and where: bitsandbytes' CPU and GPU kernels give some formats other bits
    rebuild = {} if quantized is None else recorded_quantize(quantized, header.dtype, "the log's header")
    return ModelConfig(name=base, dtype=header.dtype, device=device, revision=header.extra.get("revision"), **rebuild)


def load_base(base: str, header: TrajectoryHeader, device: str = "auto"):
    """The model the logged run started from: base weights (quantized as the run's were), then its LoRA adapters."""
    model, tokenizer = load_model(base_config(base, header, device))
    if "lora" in header.extra:
        torch.manual_seed(header.seed)  # the trainer seeds adapter init the same way
        model = apply_lora(model, LoraSettings(**header.extra["lora"]))
    return model, tokenizer


@torch.no_grad()
def replay_into(model, header: TrajectoryHeader, records: list[dict[str, Any]]) -> None:
    """Apply the updates of ``records`` (consecutive steps from 0) to ``model`` in place."""
    params = trainable_params(model)
    masks: dict[str, float] = {}
    for line in records:
        masks = line.get(MASK_FIELD, masks)  # logged by the step that set them (a skipped one too)
        if line.get("skipped"):  # a non-finite loss: the run applied nothing
            continue
        update = from_log(line, header.weight_decay)
        for p in params:  # on a CUDA device through the kernels the run used there
            apply_record(p.param, p.key, update, header.perturbation, kernels.fused_for(p.param),
                         threshold=masks.get(p.name))


# --------------------------------------------------------------------------- checks


def check_replayable(header: TrajectoryHeader, what: str = "replay cannot rebuild its weights; use the run's "
                     "checkpoints") -> None:
    """Refuse a hybrid run's log: its first-order updates are in the checkpoints, not in the log."""
    hybrid = header.extra.get("first_order")
    if hybrid:
        raise ValueError(f"the log's run trained {','.join(hybrid['patterns'])} by backprop (optim.first_order), and "
                         f"the trajectory log records only the zeroth-order updates, so {what}")


def check_steps(records: list[dict[str, Any]]) -> None:
    """The steps of one whole run: 0, 1, 2, ... with none missing or repeated."""
    for expected, record in enumerate(records):
        step = record["step"]
        if step == expected:
            continue
        if expected == 0:
            raise ValueError(f"the trajectory log starts at step {step}, not 0: it is not a whole run's log")
        what = f"step {step} again" if step < expected else f"step {step} (steps {expected}..{step - 1} are missing)"
        raise ValueError(f"the trajectory log is not one run's whole log: after step {expected - 1} comes {what}")
    if not records:
        raise ValueError("the trajectory log has no steps to replay")


def _last_to_replay(records: list[dict[str, Any]], upto: int | None) -> int:
    last = len(records) - 1
    if upto is None:
        return last
    if not 0 <= upto <= last:
        raise ValueError(f"--upto {upto} is outside the logged steps 0..{last}")
    return upto


def check_base(model, header: TrajectoryHeader, base: str) -> None:
    """Refuse a base other than the log's; warn when an older log cannot tell."""
    if header.base is None:
        warnings.warn(f"the log records no base fingerprint (written by an older distzo): '{base}' could not "
                      "be verified as the run's base model", ReplayWarning, stacklevel=3)
        return
    differs = BaseIdentity.of(model).mismatch(header.base)
    if differs:
        raise ValueError(f"'{base}' is not the base model of this log's run: {differs}")


def check_environment(header: TrajectoryHeader, device: str) -> None:
    if header.environment is None:
        return
    here = describe(resolve_device(device), quantized="quantize" in header.extra)
    differ = [f"{k} {header.environment.get(k)} -> {v}" for k, v in here.items() if header.environment.get(k) != v]
    if differ:
        warnings.warn(f"the run was written on another stack ({', '.join(differ)}): bit-exactness is promised "
                      "only on the same versions and device kind", ReplayWarning, stacklevel=3)


def check_output(output: str | os.PathLike, base: str, log: Path, overwrite: bool) -> None:
    """Refuse an ``output`` whose replacement would destroy something, or that is not empty
    (unless ``overwrite``): a run's checkpoints or log, a checkpoint of training, the base."""
    out = Path(output).expanduser().resolve()  # through symlinks: a link to checkpoints/last is that folder
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output '{output}' is a file, not a folder")
    for folder in (*reversed(out.parents), out):  # outermost first: "inside a run's checkpoints" says most
        _refuse_run_folder(output, folder, inside=folder != out)
    _refuse_overlap(output, out, log.resolve(), "the trajectory log")
    base_path = _base_path(base)
    if base_path is not None:
        _refuse_overlap(output, out, base_path.resolve(), "the base model")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--output '{output}' is not empty; pass --overwrite to replace it")
        for folder, _, _ in os.walk(out):
            _refuse_run_folder(output, Path(folder), inside=False)


def _refuse_run_folder(output, folder: Path, inside: bool) -> None:
    """Never write at or under a run's checkpoints, nor into a run's folder or a training checkpoint."""
    if folder.name == "checkpoints" and (folder.parent / LOG_NAME).is_file():
        raise FileExistsError(f"--output '{output}' is inside the checkpoints of the run in '{folder.parent}'; "
                              "replay never writes there, even with --overwrite")
    if not inside and (folder / LOG_NAME).is_file():
        raise FileExistsError(f"--output '{output}' would replace the training run in '{folder}'; "
                              "replay never does, even with --overwrite")
    if _is_training_checkpoint(folder):
        raise FileExistsError(f"--output '{output}' would write into the training checkpoint '{folder}'; "
                              "replay never does, even with --overwrite")


def _is_training_checkpoint(folder: Path) -> bool:
    state_file = next((folder / n for n in (TRAINER_STATE, LEGACY_TRAINER_STATE) if (folder / n).is_file()), None)
    if state_file is None:
        return False
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # cannot tell: keep it
    return not isinstance(state, dict) or ("step" in state and "replayed_from" not in state)


def _refuse_overlap(output, out: Path, other: Path, what: str) -> None:
    # Writing inside it, or replacing a folder that contains it, would change or delete it.
    if out == other or other in out.parents or out in other.parents:
        raise FileExistsError(f"--output '{output}' overlaps {what} ('{other}'); choose a folder outside it")


def _base_path(base: str) -> Path | None:
    """Where the base's files are; None for a Hub id (replay never writes into the Hub cache)."""
    source = resolve_source(base)
    if source.kind == "default":
        return default_cache_dir() / CONVERTED_NAME
    if source.kind == "gguf":
        return Path(source.location) / source.gguf_file
    return Path(source.location) if source.kind == "local" else None
