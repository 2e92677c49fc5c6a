"""Typed run configuration: defaults < YAML file < command-line flags.

Every field is a dataclass field with a type and a default, so the YAML schema, the
``--help`` text and the validation all come from one place. Nested sections are
addressed with dots on the command line (``--optim.lr 1e-5``); the common ones have
short aliases (``--lr``, ``--model``, ``--task``). YAML and flags are merged into
``TrainConfig()`` field by field: setting one field of a section keeps the others at the
values the default job gives them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distzo import loggers
from distzo.algorithms import check_algorithm
from distzo.algorithms.fzoo import FZOOConfig
from distzo.algorithms.mezo import MeZOConfig
from distzo.algorithms.momentum import MomentumConfig
from distzo.algorithms.sparse import SparseConfig
from distzo.directions import check_kind
from distzo.estimator import check_estimator
from distzo.evaluate import check_batch_size
from distzo.models import LoraSettings, ModelConfig
from distzo.offload import OffloadConfig
from distzo.parallel import ParallelConfig
from distzo.rundir import CONFIG_FILE
from distzo.rundir import inspect as inspect_folder
from distzo.schedules import Schedule
from distzo.tasks import TaskConfig


@dataclass
class OptimConfig:
    """ZO-SGD hyper-parameters (MeZO's names and meanings)."""

    lr: float = 1e-6
    """Learning rate (peak, before the schedule)."""
    eps: float = 1e-3
    """Perturbation scale: the losses are measured at θ ± eps·z."""
    weight_decay: float = 0.0
    """Weight decay λ: each update also subtracts lr·λ·θ (not from biases and norm weights)."""
    directions: int = 1
    """q: directions (pairs of perturbed forwards) per step."""
    perturbation: str = "gaussian"
    """gaussian | rademacher | rademacher-packed (the same signs' distribution, 128 per random draw: a cheaper GPU
    pass where several directions are regenerated, as momentum does) | rademacher-shared (the same distribution,
    a step's probes sharing each random word: the cheapest GPU pass for fzoo and q > 1)"""
    estimator: str = "two-sided"
    """two-sided | one-sided"""
    schedule: str = "constant"
    """constant | linear | cosine (decaying over `steps`)"""
    warmup_steps: int = 0
    """Steps of linear lr warm-up from 0 (0 = none)."""
    min_lr_ratio: float = 0.0
    """Where linear and cosine decay end, as a fraction of lr."""
    algorithm: str = "mezo"
    """The zeroth-order algorithm (distzo.algorithms): mezo (ZO-SGD), fzoo (N probes, normalised), momentum (heavy-ball from the last h steps), sparse (only the small weights)."""
    eps_schedule: str = "constant"
    """constant | linear | cosine: eps decays over `steps` to eps_min_ratio * eps."""
    eps_min_ratio: float = 1.0
    """Where a decaying eps schedule ends, as a fraction of eps."""
    eps_band_low: float = 0.0
    """Adaptive eps: grow eps while the mean |L+ - L-| is below this (needs eps_band_high)."""
    eps_band_high: float = 0.0
    """Adaptive eps: shrink eps while the mean |L+ - L-| is above this (0 = eps does not adapt)."""
    first_order: list[str] = field(default_factory=list)
    """Parameters trained by backprop instead: comma-separated shell-style patterns (fnmatch, * spans dots) over the
    canonical names of model.named_parameters(), e.g. model.norm.*,lm_head.* or model.layers.29.*; the ZO
    algorithm trains every other trainable parameter (docs/hybrid.md). Empty = none."""
    first_order_lr: float = 1e-4
    """AdamW learning rate of the optim.first_order parameters (constant)."""
    first_order_weight_decay: float = 0.0
    """AdamW (decoupled) weight decay of the optim.first_order parameters."""
    cuda_graphs: bool = False
    """Replay each unit call of the forward from a CUDA graph once seen twice (CUDA with Triton, resident, no
    optim.first_order): the same results, without the host's per-launch cost, which sets the pace of small models,
    short batches and LoRA; one graph per input shape (see data: pad_to_multiple_of), memory for each (docs/kernels.md)."""
    batch_streams: bool = False
    """Run each block once over all probes' rows, only its layers owning perturbed parameters (linear, embedding,
    norm) stream by stream: with LoRA or QLoRA the frozen base's products and attention run once a forward instead
    of once a probe (docs/kernels.md). The losses equal the unbatched ones up to the rounding of the frozen products
    over more rows, so a resumed run keeps the setting. Blocks of other layers run as without it."""
    mezo: MeZOConfig = field(default_factory=MeZOConfig)
    fzoo: FZOOConfig = field(default_factory=FZOOConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "weight_decay", "min_lr_ratio", "first_order_lr", "first_order_weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if self.directions < 1:
            raise ValueError(f"optim.directions must be >= 1, got {self.directions}")
        check_kind(self.perturbation)
        check_estimator(self.estimator)
        check_algorithm(self.algorithm)
        Schedule(self.eps_schedule, 0, 1, self.eps_min_ratio)  # checks the name and the ratio
        if self.eps_band_high and not 0 < self.eps_band_low < self.eps_band_high:
            raise ValueError(f"optim.eps_band_low must be in (0, eps_band_high), got {self.eps_band_low}")
        if any(not pattern.strip() for pattern in self.first_order):
            raise ValueError("optim.first_order holds an empty pattern")
        if self.algorithm == "fzoo" and self.directions != 1:
            raise ValueError("optim.directions does not apply to fzoo: set optim.fzoo.probes")

    def schedule_for(self, steps: int) -> Schedule:
        return Schedule(self.schedule, self.warmup_steps, steps, self.min_lr_ratio)


@dataclass
class TrainConfig:
    """One training run. The defaults are the offline default job: full-parameter ZO on the
    packaged SmolLM2-135M-Instruct and rotten_tomatoes, sized for under 10 minutes on 2 CPU cores."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune and how to load it."""
    task: TaskConfig = field(default_factory=lambda: TaskConfig(num_test=500))
    """The default job holds out 500 balanced examples; MeZO's protocol uses 1,000 (configs/)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5, eps=1e-3))
    """The default job's values (135M parameters, 120 steps); MeZO uses lr 1e-6..1e-7 on 1B+ models."""
    use_lora: bool = False
    """Train LoRA adapters (settings under `lora`) instead of all weights."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapter settings, used with `use_lora`."""
    steps: int = 120
    """Training steps (each one batch and optim.directions pairs of forwards)."""
    batch_size: int = 16
    """Training examples per step."""
    group_by_length: bool = True
    """Batch training examples of similar length together (less padding, faster steps)."""
    eval_every: int = 0
    """Evaluate on the dev split (and keep the best checkpoint) every N steps; 0 = never."""
    test_at_best: bool = True
    """When evaluating on dev, also score the test split at each new best dev checkpoint, so the results
    report test at the best dev checkpoint (MeZO's protocol) beside test at the last step."""
    eval_batch_size: int | str = 32
    """Examples per forward when evaluating, or auto: as many as fit in half the free GPU memory (16 on the CPU),
    so an offloaded block comes up once for as many examples as fit."""
    save_every: int = 500
    """Also write the `last` checkpoint every N steps, bounding what a killed run must replay from its
    trajectory log on resume (0 = only at eval time, on a signal and at the end)."""
    log_every: int = 10
    """Record loss, lr and throughput (metrics.jsonl, TensorBoard) every N steps."""
    output_dir: str = "runs/distzo"
    """Folder of the run: config, trajectory log, metrics, checkpoints."""
    seed: int = 0
    """Seed of the directions, the batch order and the LoRA initialisation (task.seed samples the data)."""
    zero_shot: bool = True
    """Evaluate the model on the test split before training."""
    time_limit_minutes: float = 0.0
    """Stop training (then evaluate and save as usual) after this much wall time; 0 = none."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Loggers of the metrics besides metrics.jsonl: tensorboard (under `output_dir`/tb), wandb, mlflow,
    comma-separated, or none; wandb and mlflow are extras (pip install 'distzo[wandb]'). The flag it replaces,
    --tensorboard true|false, still means tensorboard|none."""
    progress: bool = True
    """Show a progress bar while training."""
    resume: bool = False
    """Continue the run in `output_dir` from its last checkpoint."""
    max_skipped_steps: int = 10
    """Abort after this many consecutive steps with a non-finite loss."""
    push_to_hub: str | None = None
    """At the end of the run, upload the `push_checkpoint` checkpoint to this Hub model repo (user/name,
    created if missing; the token of `hf auth login` or HF_TOKEN)."""
    push_checkpoint: str = "last"
    """best | last: the checkpoint `push_to_hub` uploads (best needs `eval_every`)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the ranks of a torchrun job split each step (`batch_size` is the global batch)."""
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    """Stream the decoder blocks from host memory (models larger than the GPU); under torchrun, one host copy per node, sliced."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_batch_size(self.eval_batch_size, "eval_batch_size")
        for name in ("eval_every", "save_every", "time_limit_minutes", "max_skipped_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.output_dir.strip():  # "" would write the run into the current folder
            raise ValueError("output_dir must not be empty")
        self.optim.schedule_for(self.steps)  # a bad schedule fails here, not after the model has loaded
        self.report_to = loggers.check(_legacy_report_to(self.report_to))
        self._check_quantize()
        self._check_graphs()
        self._check_push()
        if self.use_lora and self.optim.algorithm == "sparse":
            # LoRA's B starts at zero: its threshold would be 0, and B would freeze after one step
            raise ValueError("optim.algorithm sparse tunes the small weights of the model itself; it does not work "
                             "with LoRA (--lora false)")

    def _check_quantize(self) -> None:
        if self.model.quantize is None:
            return
        if not self.use_lora:
            raise ValueError(f"model.quantize {self.model.quantize} needs LoRA (--lora): a quantized base is frozen, "
                             "only adapters can train on it")
        if self.model.base_compute is not None and self.optim.first_order:
            raise ValueError(f"optim.first_order backpropagates through the base, which model.base_compute "
                             f"{self.model.base_compute} computes without a backward; drop one of them")

    def _check_graphs(self) -> None:
        if not self.optim.cuda_graphs:
            return
        if self.offload.enabled:  # the engine's uploads and slots are driven by the host, block by block
            raise ValueError("optim.cuda_graphs does not combine with offload; drop one of them")
        if self.optim.first_order:
            raise ValueError("optim.cuda_graphs does not combine with optim.first_order (its backward records a graph)")

    def _check_push(self) -> None:
        if self.push_checkpoint not in ("best", "last"):
            raise ValueError(f"push_checkpoint must be best or last, got {self.push_checkpoint!r}")
        if self.push_to_hub is None:
            return
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(self.push_to_hub)
        except HFValidationError:
            raise ValueError(f"push_to_hub {self.push_to_hub!r} is not a Hub repo id (user/name)") from None
        if self.push_checkpoint == "best" and not self.eval_every:
            raise ValueError("push_checkpoint best needs eval_every > 0: only evaluating on dev keeps a best one")


def _legacy_report_to(names: list[str]) -> list[str]:
    """``tensorboard: true|false`` (config.yaml of older runs, the --tensorboard alias) as report_to."""
    try:
        return ["tensorboard" if _to_bool(names[0]) else loggers.NONE] if len(names) == 1 else names
    except ValueError:
        return names


def _renamed(values: dict[str, Any]) -> dict[str, Any]:
    """Settings under the key that replaced an old one: old files keep loading."""
    if "tensorboard" not in values:
        return values
    if "report_to" in values:
        raise ValueError("config key 'tensorboard' was replaced by 'report_to'; give report_to alone")
    kept = {k: v for k, v in values.items() if k != "tensorboard"}
    return {**kept, "report_to": str(values["tensorboard"]).lower()}


# ---------------------------------------------------------------- building from dicts


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def build(base, values: dict[str, Any], prefix: str = ""):
    """``base`` with ``values`` merged in, field by field at every depth; strict about unknown keys.

    A section starts from ``base``'s value for it (for ``TrainConfig()``, its default_factory),
    not from the section class's defaults: ``optim: {eps: 0.01}`` keeps the default job's lr.
    A section that changes is validated by its ``__post_init__`` as it is replaced.
    """
    hints = _field_types(type(base))
    known = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key '{prefix}{unknown[0]}'; known: {', '.join(sorted(known))}")
    changes = {}
    for name, value in values.items():
        if _is_section(hints[name]):
            if not isinstance(value, dict):
                raise ValueError(f"config key '{prefix}{name}' must be a mapping")
            changes[name] = build(getattr(base, name), value, f"{prefix}{name}.")
        else:
            changes[name] = coerce(value, hints[name], f"{prefix}{name}")
    return dataclasses.replace(base, **changes)


def coerce(value: Any, tp, where: str):
    """Check (and for numbers, convert) a YAML/CLI value to a field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        value = _first_fit(value, options, where)
        if isinstance(value, str) and not value.strip():  # None already says "unset"; "" would be a path to "."
            raise ValueError(f"config key '{where}' must not be empty; leave it out or set it to null")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ValueError(f"config key '{where}' expects a list, got {value!r}")
        return [coerce(v, item, where) for v in value]
    if tp in (bool, int, float, str):
        return _scalar(value, tp, where)
    return value


def _first_fit(value: Any, options: list, where: str):
    """``value`` as the first of a union's types it converts to (``int | str``: "32" is 32, "auto" stays)."""
    for tp in options[:-1]:
        try:
            return coerce(value, tp, where)
        except ValueError:
            pass
    return coerce(value, options[-1], where)


def _scalar(value: Any, tp, where: str):
    # str() would accept anything: a YAML mapping would become a folder named "{'a': 1}".
    if value is None or isinstance(value, (dict, list)) or (isinstance(value, bool) and tp in (int, float)):
        raise ValueError(f"config key '{where}' expects {tp.__name__}, got {value!r}")
    try:
        if tp is bool:
            return _to_bool(value)
        if tp is int:
            number = float(value) if isinstance(value, str) else value
            if number != int(number):
                raise ValueError
            return int(number)
        if tp is str:
            return str(value)
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ValueError(f"config key '{where}' expects {tp.__name__}, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"config key '{where}' must be a finite number, got {value!r}")
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def dotted_to_nested(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(_utf8_text(path)) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file '{path}' is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must hold a mapping at the top level")
    return data


def _utf8_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"config file '{path}' is not UTF-8: byte {err.start} (line {line}): {err.reason}") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where: the first line of the message alone often says neither."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return str(exc).splitlines()[0]
    return f"{getattr(exc, 'problem', None) or exc} at line {mark.line + 1}, column {mark.column + 1}"


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then dotted overrides (``{"optim.lr": 1e-5}``).

    A resume starts from the run's own config.yaml instead of the defaults, so ``--resume`` alone
    continues the run as it was set up (the trainer refuses changes a resume may not make).
    """
    values = _renamed(merge(read_yaml(path) if path else {}, dotted_to_nested(overrides or {})))
    cfg = build(TrainConfig(), values)
    run = run_config(cfg.output_dir) if cfg.resume else None
    return cfg if run is None else build(run, values)


def run_config(output_dir: str | Path) -> TrainConfig | None:
    """The settings a run in ``output_dir`` was started with (its config.yaml); None if it holds no run."""
    saved = Path(output_dir) / CONFIG_FILE
    if not saved.is_file() or inspect_folder(saved.parent).kind != "run":
        return None
    try:
        return build(TrainConfig(), _renamed(read_yaml(saved)))
    except ValueError as exc:
        raise ValueError(f"--resume: the run's {saved} cannot be read: {exc}") from None


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat_fields(cfg: Any = None, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted name, type, value, doc) of every leaf field of ``cfg``, for building the CLI.

    The values are those of ``cfg`` (by default ``TrainConfig()``, the run's effective defaults),
    not the field defaults of the section classes.
    """
    cfg = TrainConfig() if cfg is None else cfg
    out = []
    hints = _field_types(type(cfg))
    docs = _field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _is_section(hints[f.name]):
            out += flat_fields(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name], value, docs.get(f.name, "")))
    return out


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under a field), read from the source, as plain
    text: reST's double backquotes are dropped, since ``--help`` would show them as typed."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = " ".join(str(node.value.value).replace("``", "").split())
    return docs

