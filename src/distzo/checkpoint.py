"""Durable, atomic checkpoints and the trajectory log.

A zeroth-order step changes the weights by (seed, projected gradient, learning rate): a few
bytes. So the durable record of a run is the trajectory log, one fsync'd JSON line per step;
base weights + log rebuild the trained weights exactly (``replay``). Full checkpoints are a
shortcut for resuming and for handing the model to ordinary transformers code.

Both survive a kill at any instant:

* a checkpoint is written into ``<dir>.tmp-<pid>``, fsync'd, marked ``COMPLETE`` and only then
  swapped in by renames, so ``<dir>`` (or, in the instant between the two renames, one of
  its siblings) always holds a complete checkpoint;
* the log is append-only, one line per step, and a torn last line is dropped on read.

One process writes a given checkpoint directory or log (rank 0 in a distributed run).

    save_checkpoint("out/ckpt", model, tokenizer, {"step": 500, "metrics": {...}})
    state = load_checkpoint_state("out/ckpt")["trainer_state"]
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import operator
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from distzo.durable import fsync_dir, fsync_tree
from distzo.models import canonical_dtype
from distzo.records import UpdateRecord, log_fields

COMPLETE = "COMPLETE"
# Not Hugging Face's trainer_state.json: the layout is distzo's own, so is the name.
TRAINER_STATE = "distzo_state.json"
OPTIMIZER_STATE = "optimizer.json"
# Checkpoints written before the rename; read, never written.
LEGACY_TRAINER_STATE = "trainer_state.json"
LEGACY_OPTIMIZER_STATE = "optimizer.pt"
ADAPTER_DIR = "adapter"
CHECKPOINT_FORMAT = 1

# --------------------------------------------------------------------------- atomic files


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------- checkpoints


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a checkpoint whose writing finished (its marker is written last)."""
    return (Path(directory) / COMPLETE).is_file()


def save_checkpoint(
    directory: str | os.PathLike,
    model,
    tokenizer,
    state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
    *,
    merged: bool = True,
    extra_files: Mapping[str, str] | None = None,
    tensor_files: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a complete checkpoint to ``directory``, replacing any previous one atomically.

    ``state`` is the trainer state (JSON-serialisable, with an integer ``"step"``); so is the
    optimizer state (a ZO optimizer's state is a few scalars). A PEFT model is saved
    twice: its adapter in ``adapter/`` and, when ``merged``, the merged full model at the top
    so that ``AutoModelForCausalLM.from_pretrained(directory)`` works without peft.
    ``extra_files`` ({name: text}, e.g. the model card as README.md) are written last, so they
    replace a file of the same name that ``save_pretrained`` wrote; ``tensor_files`` ({name:
    {key: tensor}}) are safetensors files beside them (an optimiser's moments, say).
    """
    dest = Path(directory)
    state_text = _trainer_state_json(state)  # fail before touching the disk
    optimizer_text = None if optimizer_state is None else _exact_json(optimizer_state)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(dest)
    tmp = _sibling(dest, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_contents(tmp, model, tokenizer, state_text, optimizer_text, merged)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, tensors in (tensor_files or {}).items():
            save_file(dict(tensors), tmp / name)
        fsync_tree(tmp)
        atomic_write_json(tmp / COMPLETE, {"format": CHECKPOINT_FORMAT, "step": state["step"]})
        _swap_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _trainer_state_json(state: Mapping[str, Any]) -> str:
    if not isinstance(state, Mapping):
        raise TypeError(f"trainer state must be a mapping, got {type(state).__name__}")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"trainer state needs a non-negative integer 'step', got {step!r}")
    return _exact_json(state, "trainer state")


def _exact_json(obj: Mapping[str, Any], what: str = "optimizer state") -> str:
    """JSON in which every integer too large for a double (seeds) is a decimal string, so
    readers other than Python (jq, JavaScript) keep it exact; ``int()`` reads either form back."""
    try:
        return json.dumps(_big_ints_as_text(dict(obj)), indent=2) + "\n"
    except TypeError as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from exc


def _big_ints_as_text(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _big_ints_as_text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_big_ints_as_text(v) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool) and abs(obj) >= 2**53:
        return str(obj)
    return obj


def _write_contents(tmp: Path, model, tokenizer, state_text: str, optimizer_text: str | None, merged: bool) -> None:
    if _is_peft(model):
        model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        if merged:
            _merged_copy(model).save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / TRAINER_STATE).write_text(state_text, encoding="utf-8")
    if optimizer_text is not None:
        (tmp / OPTIMIZER_STATE).write_text(optimizer_text, encoding="utf-8")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _merged_copy(model):
    # Merging in place and unmerging afterwards would not restore the weights bit for bit
    # (W + BA - BA != W in floating point), and resume must be exact; so merge a copy.
    # The copy costs one more model in memory: fine for the models LoRA is used with here.
    return copy.deepcopy(model).merge_and_unload()


def _sibling(dest: Path, kind: str) -> Path:
    return dest.with_name(f"{dest.name}.{kind}-{os.getpid()}")


def _siblings(dest: Path) -> list[Path]:
    found = [*dest.parent.glob(f"{dest.name}.tmp-*"), *dest.parent.glob(f"{dest.name}.old-*")]
    return [p for p in found if p.is_dir()]


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``, moving an existing ``dest`` aside first.

    A kill between the two renames leaves no ``dest`` but two complete siblings, which
    ``recover_checkpoint`` (and ``load_checkpoint_state``, read-only) know how to use. An
    exception in that window moves the old checkpoint back.
    """
    aside = None
    if dest.exists():
        aside = _sibling(dest, "old")
        os.replace(dest, aside)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if aside is not None:
            os.replace(aside, dest)
        raise
    fsync_dir(dest.parent)
    if aside is not None:
        _discard(aside)


def _discard(folder: Path) -> None:
    # Unmark first: a deletion killed halfway must not leave a folder that looks complete.
    (folder / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def _best_sibling(dest: Path) -> Path | None:
    # Both siblings complete means the kill came between the two renames: the new one
    # (tmp) is the later state. Among several, the most recently written wins.
    complete = [p for p in _siblings(dest) if is_complete(p)]
    complete.sort(key=lambda p: (".tmp-" in p.name, (p / COMPLETE).stat().st_mtime_ns), reverse=True)
    return complete[0] if complete else None


def recover_checkpoint(directory: str | os.PathLike) -> None:
    """Finish what a killed ``save_checkpoint`` left: restore a missing ``directory`` from a
    complete sibling and delete the other leftovers. Only the checkpoint's writer may call it.
    """
    dest = Path(directory)
    if not dest.exists():
        best = _best_sibling(dest)
        if best is not None:
            os.replace(best, dest)
            fsync_dir(dest.parent)
    for leftover in _siblings(dest):
        _discard(leftover)


def readable_checkpoint(directory: str | os.PathLike) -> Path:
    """The folder holding the complete checkpoint ``directory`` stands for, without changing
    anything on disk (a reader may run beside the writer)."""
    dest = Path(directory)
    if is_complete(dest):
        return dest
    if not dest.exists():
        best = _best_sibling(dest)
        if best is not None:
            return best
        raise FileNotFoundError(f"no checkpoint at '{dest}'")
    raise ValueError(
        f"checkpoint '{dest}' is incomplete (no {COMPLETE} marker): its writing was interrupted; "
        "resume from another checkpoint or from the trajectory log"
    )


def load_checkpoint_state(directory: str | os.PathLike) -> dict[str, Any]:
    """``{"trainer_state": dict, "optimizer_state": dict | None, "path": str}``.

    ``path`` is where the checkpoint was found (normally ``directory``); load the model's
    weights from there too.
    """
    path = readable_checkpoint(directory)
    state_file = path / TRAINER_STATE
    if not state_file.is_file() and (path / LEGACY_TRAINER_STATE).is_file():
        state_file = path / LEGACY_TRAINER_STATE
    trainer_state = _read_json(state_file)
    optimizer_state = None
    if (path / OPTIMIZER_STATE).is_file():
        optimizer_state = _read_json(path / OPTIMIZER_STATE)
    elif (path / LEGACY_OPTIMIZER_STATE).is_file():
        optimizer_state = torch.load(path / LEGACY_OPTIMIZER_STATE, map_location="cpu", weights_only=True)
    return {"trainer_state": trainer_state, "optimizer_state": optimizer_state, "path": str(path)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file '{path}' is missing") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"checkpoint file '{path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint file '{path}' does not hold a JSON object")
    return data


# --------------------------------------------------------------------------- trajectory log

# Values sampled from each tensor for the weights fingerprint: two different bases (or a
# base and a fine-tune of it) differ in almost every element, so a few thousand tell them
# apart, and reading them costs nothing even for a 175B model in host memory.
FINGERPRINT_SAMPLE = 2048
SEED_LIMIT = 2**64  # seeds are unsigned 64-bit integers
STEP_FIELDS = ("step", "seeds", "grads", "lr", "loss")
# Header fields that describe where the run started rather than how it trains: a resumed run
# keeps the values its log recorded at step 0 (it resumes from a checkpoint, not the base).
PROVENANCE = ("base", "environment")


@dataclass
class BaseIdentity:
    """What tells the base model of a run apart from any other model, cheaply.

    Replay compares it before applying a single update: a base of another family, another
    size, or with other weights would otherwise give wrong weights without a word.
    """

    model_type: str
    """``config.model_type``, e.g. ``"llama"``."""
    architectures: list[str]
    """The class transformers built, e.g. ``["LlamaForCausalLM"]`` (what ``save_pretrained`` writes
    as ``config.architectures``; a Hub config may list another class for the same weights)."""
    params: str
    """blake2b of the trainable parameters' names, shapes and dtypes, in order."""
    weights: str
    """blake2b of every parameter's name, shape, dtype and a fixed strided sample of its values, taken
    after LoRA init: for a LoRA run it covers the frozen base as well as the adapters."""

    def __post_init__(self) -> None:
        classes = self.architectures if isinstance(self.architectures, list) else [None]
        if not all(isinstance(t, str) and t for t in [self.model_type, self.params, self.weights, *classes]):
            raise ValueError(f"a base identity needs non-empty strings, got {asdict(self)}")

    @classmethod
    def of(cls, model) -> BaseIdentity:
        """The identity of ``model`` as it is now: on CPU, GPU or offloaded to host memory alike."""
        from distzo.units import trainable_params

        core = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
        shapes = hashlib.blake2b(digest_size=16)
        for p in trainable_params(model):
            shapes.update(f"{p.name}:{tuple(p.param.shape)}:{p.param.dtype}\n".encode())
        values = hashlib.blake2b(digest_size=16)
        for name, param in model.named_parameters():
            values.update(f"{name}:{tuple(param.shape)}:{param.dtype}\n".encode())
            values.update(_sample_bytes(name, param))
            for scale in _quantization_scales(param):
                values.update(_sample_bytes(name, scale))
        return cls(core.config.model_type, [type(core).__name__], shapes.hexdigest(), values.hexdigest())

    def mismatch(self, logged: BaseIdentity) -> str | None:
        """How this base differs from the ``logged`` one, in words; None when it is the same."""
        if (self.model_type, self.architectures) != (logged.model_type, logged.architectures):
            return (f"its architecture is {self.model_type} {self.architectures}, the log's base is "
                    f"{logged.model_type} {logged.architectures}")
        if self.params != logged.params:
            return "its trainable parameters (names, shapes or dtypes) differ from those of the log's base"
        if self.weights != logged.weights:
            return "its weights differ from those of the log's base (weights fingerprint)"
        return None


def _quantization_scales(param: torch.Tensor) -> list[torch.Tensor]:
    """The scales of a weight quantized by bitsandbytes (none for any other tensor): the codes alone
    do not fix the weights, since W and 2W quantize to the same 4-bit codes with other scales."""
    state = getattr(param, "quant_state", None)  # 4-bit: a block-wise absmax, itself quantized when nested
    found = [getattr(param, "SCB", None)]  # int8: one scale per row
    if state is not None:
        found += [state.absmax, state.state2.absmax if getattr(state, "nested", False) else None]
    return [t for t in found if isinstance(t, torch.Tensor)]


def _sample_bytes(name: str, param: torch.Tensor) -> bytes:
    if param.is_meta:
        raise ValueError(f"parameter '{name}' has no weights (meta device); it cannot be fingerprinted")
    flat = param.detach().reshape(-1)  # a view: parameters are contiguous
    n = flat.numel()
    if n == 0:
        return b""
    k = min(n, FINGERPRINT_SAMPLE)
    index = torch.arange(k, device=flat.device) * n // k
    # Gather where the tensor lives, hash on the CPU: the same bytes from GPU, host or offload.
    return flat[index].cpu().view(torch.uint8).numpy().tobytes()


@dataclass
class TrajectoryHeader:
    """What replay needs besides the per-step records: the base model and the update rule."""

    model: str
    """The base model, as ``ModelConfig.name`` spells it."""
    perturbation: str = "gaussian"
    eps: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    """The run seed, from which every step seed derives."""
    q: int = 1
    """Directions per step."""
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else replay must agree on (revision, LoRA settings, ...); JSON values."""
    base: BaseIdentity | None = None
    """The base model as built at step 0; None in logs written before it was recorded."""
    environment: dict[str, str | None] | None = None
    """Versions and device kind the run started on (``distzo.environment.describe``)."""
    algorithm: str = "mezo"
    """The zeroth-order algorithm that made the updates; logs written before it was recorded are MeZO's."""
    algorithm_settings: dict[str, Any] | None = None
    """The algorithm's own settings (``settings()``: optim.<name>.*, an eps rule); None in logs written
    before they were recorded, which were plain MeZO's."""

    def __post_init__(self) -> None:
        from distzo.algorithms import check_algorithm
        from distzo.directions import KINDS

        if not self.model:
            raise ValueError("trajectory header needs the base model name")
        if self.perturbation not in KINDS:
            raise ValueError(f"perturbation must be one of {KINDS}, got '{self.perturbation}'")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive number, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not isinstance(self.q, int) or self.q < 1:
            raise ValueError(f"q must be an integer >= 1, got {self.q}")
        if self.base is not None and not isinstance(self.base, BaseIdentity):
            raise ValueError(f"base must be a BaseIdentity, got {type(self.base).__name__}")
        if self.environment is not None and not isinstance(self.environment, dict):
            raise ValueError(f"environment must be a mapping of names to versions, got {self.environment!r}")
        check_algorithm(self.algorithm)
        self.dtype = canonical_dtype(self.dtype)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrajectoryHeader:
        """From the header line's JSON; logs written before ``base`` and ``environment`` read too."""
        data = dict(_known_keys(cls, data, "trajectory header"))
        if data.get("base") is not None:
            data["base"] = BaseIdentity(**_known_keys(BaseIdentity, data["base"], "base identity"))
        return cls(**data)

    def settings(self) -> dict[str, Any]:
        """The fields a resumed run must agree on (all but the provenance)."""
        return {k: v for k, v in asdict(self).items() if k not in PROVENANCE}


def _known_keys(cls, data: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {data!r}")
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}")
    return data


class TrajectoryLog:
    """Append-only JSON-lines log: a header line, then one line per optimiser step, with event
    lines (accepted setting changes, say) between them.

        {"header": {"model": "default", "perturbation": "gaussian", "eps": 0.001, ...}}
        {"step": 0, "seeds": ["13480097462331432718"], "grads": [-0.42], "lr": 1e-06, "loss": 2.31}
        {"event": "extended", "step": 100, "steps": 300}

    A line counts once its newline is on disk: ``append`` writes the line and its newline
    in one write and fsyncs before returning, and ``read`` drops an unterminated or
    unparseable last line (a crash mid-write). Floats are written with ``repr`` precision,
    which round-trips every double exactly, so replay sees the very numbers the run used.
    Seeds are 64-bit, beyond the integers a double holds (jq, JavaScript), so they are
    written as decimal strings; logs with integer seeds read too. Readers get ints.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None
        self._last_step: int | None = None

    # ----- reading

    def _body(self, lines: list[dict]) -> list[dict]:
        """The lines after the header, each a JSON object; only the first line is a header."""
        if not lines or not isinstance(lines[0], dict) or "header" not in lines[0]:
            raise ValueError(f"{self.path} has no trajectory header line")
        for number, line in enumerate(lines[1:], start=2):
            if not isinstance(line, dict) or "header" in line:
                what = "a second header (two logs joined?)" if isinstance(line, dict) else "not a JSON object"
                raise ValueError(f"{self.path}: line {number} is {what}")
        return lines[1:]

    def _contents(self) -> tuple[list[dict], list[dict[str, Any]]]:
        """The lines as parsed (header first) and the records after the header, decoded."""
        lines, _ = json_lines(self.path)
        records = []
        for number, line in enumerate(self._body(lines), start=2):
            try:
                records.append(_decode_event(line) if "event" in line else _decode_step(line))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{self.path}: line {number}: {exc}") from None
        return lines, records

    def header(self) -> TrajectoryHeader:
        lines, _ = json_lines(self.path)
        self._body(lines)
        return TrajectoryHeader.from_dict(lines[0]["header"])

    def read(self) -> list[dict[str, Any]]:
        """The step records in order (not events, not the header, not a torn last line)."""
        return [r for r in self._contents()[1] if "event" not in r]

    def events(self) -> list[dict[str, Any]]:
        """The event records in order: ``{"event": kind, "step": step, ...}``."""
        return [r for r in self._contents()[1] if "event" in r]

    def last_step(self) -> int | None:
        records = self.read()
        return records[-1]["step"] if records else None

    # ----- writing

    def start(self, header: TrajectoryHeader | Mapping[str, Any]) -> TrajectoryHeader:
        """Create the log with ``header``, or check that an existing log has the same settings
        (resuming a run with other settings would make its trajectory unreplayable) and return
        the header it has: its base and environment are those of the run's step 0."""
        if not isinstance(header, TrajectoryHeader):
            header = TrajectoryHeader.from_dict(header)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, _line({"header": asdict(header)}))
            return header
        existing = self.header()
        ours, theirs = header.settings(), existing.settings()
        if theirs["algorithm_settings"] is None:  # an older log: plain MeZO, which the algorithm check covers
            ours["algorithm_settings"] = None
        if ours != theirs:
            differ = sorted(k for k in ours if ours[k] != theirs[k])
            raise ValueError(f"{self.path} belongs to a run with different settings: {differ}")
        return existing

    def append(
        self,
        step: int,
        seeds: Sequence[int],
        grads: Sequence[float],
        lr: float,
        loss: float,
        **extra: Any,
    ) -> dict[str, Any]:
        """Durably record one optimiser step; steps must increase."""
        record = _step_record(step, [_as_seed(s) for s in seeds], grads, lr, loss, extra)
        handle = self._handle()
        if self._last_step is not None and record["step"] <= self._last_step:
            raise ValueError(f"step {record['step']} does not follow the logged step {self._last_step}")
        self._write(handle, {**record, "seeds": [str(s) for s in record["seeds"]]})
        self._last_step = record["step"]
        return record

    def append_update(self, record: UpdateRecord, loss: float, **extra: Any) -> dict[str, Any]:
        """Durably record the step that made ``record`` (the fields ``records.from_log`` reads back)."""
        return self.append(**log_fields(record), loss=loss, **extra)

    def append_event(self, kind: str, step: int, **fields: Any) -> dict[str, Any]:
        """Durably record an event (a setting changed, say) that applies from ``step`` on: a step
        not logged yet, so that ``truncate_after`` drops it with the steps it came before."""
        record = _event_record(kind, step, fields)
        handle = self._handle()
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"an event at step {step} comes after the logged step {self._last_step}")
        self._write(handle, record)
        return record

    def _write(self, handle, record: Mapping[str, Any]) -> None:
        handle.write(_line(record).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())

    def _handle(self):
        if self._file is None:
            lines, end = json_lines(self.path)  # raises if the file is missing
            if not lines or "header" not in lines[0]:
                raise ValueError(f"{self.path} has no trajectory header line; call start() first")
            if end < self.path.stat().st_size:
                os.truncate(self.path, end)  # drop a torn tail before appending after it
            self._last_step = self.last_step()
            self._file = open(self.path, "ab")
        return self._file

    def truncate_after(self, step: int) -> int:
        """Keep the step records and events with ``step <= step`` (resume from a checkpoint
        older than the log's end); returns how many step records were dropped. Rewritten
        atomically, each kept line as it was."""
        self.close()
        lines, records = self._contents()
        keep = [line for line, record in zip(lines[1:], records) if record["step"] <= step]
        atomic_write_text(self.path, "".join(_line(x) for x in [lines[0], *keep]))
        return sum("event" not in r and r["step"] > step for r in records)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._last_step = None

    def __enter__(self) -> TrajectoryLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def json_lines(path: Path) -> tuple[list[Any], int]:
    """A JSON-lines file's complete lines, parsed, and the byte length they span (where a torn
    tail begins). A line counts once its newline is on disk: an unterminated or unparseable last
    line is a write a crash cut short and is dropped; a corrupt line before others is an error."""
    data = path.read_bytes()
    parsed, end = [], 0
    while end < len(data):
        newline = data.find(b"\n", end)
        if newline < 0:
            break  # unterminated: torn by a crash
        try:
            parsed.append(json.loads(data[end:newline]))
        except ValueError as exc:
            if data[newline + 1 :].strip():
                raise ValueError(f"{path}: corrupt line {len(parsed) + 1}: {exc}") from exc
            break  # garbage last line: torn too
        end = newline + 1
    return parsed, end


def _line(obj: Mapping[str, Any]) -> str:
    # NaN/inf are allowed (a diverged loss is still worth logging); Python reads them back.
    return json.dumps(obj, separators=(",", ":")) + "\n"


def _step_record(step, seeds: list[int], grads, lr, loss, extra) -> dict[str, Any]:
    """The one definition of a step record, for writing and reading alike."""
    _check_step(step)
    if "event" in extra:
        raise ValueError("'event' marks event lines; a step record cannot have it")
    grads = [float(g) for g in grads]  # exact for float32/float64 scalars and 0-d tensors
    if len(seeds) != len(grads) or not seeds:
        raise ValueError(f"need one projected gradient per seed, got {len(seeds)} seeds and {len(grads)} grads")
    return {"step": step, "seeds": seeds, "grads": grads, "lr": float(lr), "loss": float(loss), **extra}


def _decode_step(line: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in STEP_FIELDS if k not in line]
    if missing:
        raise ValueError(f"a step record needs {missing}")
    if not isinstance(line["seeds"], list) or not isinstance(line["grads"], list):
        raise ValueError("a step record's seeds and grads are lists")
    extra = {k: v for k, v in line.items() if k not in STEP_FIELDS}
    seeds = [_seed_from_json(s) for s in line["seeds"]]
    return _step_record(line["step"], seeds, line["grads"], line["lr"], line["loss"], extra)


def _event_record(kind, step, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The one definition of an event record, for writing and reading alike."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"an event needs a kind (a non-empty string), got {kind!r}")
    if "event" in fields:
        raise ValueError("'event' is the event's kind, not one of its fields")
    _check_step(step)
    record = {"event": kind, "step": step, **fields}
    _line(record)  # not JSON-serialisable: a TypeError now, not a line that never reads back
    return record


def _decode_event(line: Mapping[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in line.items() if k not in ("event", "step")}
    return _event_record(line["event"], line.get("step"), fields)


def _check_step(step) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")


def _as_seed(value) -> int:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"a seed must be an integer, got {value!r}")
    return _in_seed_range(operator.index(value))


def _seed_from_json(value) -> int:
    # Decimal strings since seeds outgrew doubles; plain integers in older logs.
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return _in_seed_range(int(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return _in_seed_range(value)
    raise ValueError(f"a seed must be a decimal string or an integer, got {value!r}")


def _in_seed_range(seed: int) -> int:
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"a seed must be an unsigned 64-bit integer, got {seed}")
    return seed
