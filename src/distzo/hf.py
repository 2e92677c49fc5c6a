"""Zeroth-order training inside a transformers Trainer script: change one line.

    from distzo.hf import ZOArguments, ZOTrainer
    trainer = ZOTrainer(model=model, args=training_args, train_dataset=ds, data_collator=collator,
                        zo_args=ZOArguments(eps=1e-3, directions=1))     # was: Trainer(...)
    trainer.train()

The Trainer keeps its datasets, collators, callbacks, logging, evaluation and checkpoints;
each optimisation step is one ``ZOOptimizer.step`` (both perturbed losses from one forward,
no backward, no gradients), so every distzo engine (fused kernels, offload) runs underneath.

How the Trainer's settings map onto the ZO step:

* ``learning_rate``, ``weight_decay`` and ``seed`` are the ZO step's lr, decay and seed unless
  ``ZOArguments`` sets them. Decay follows MeZO (no decay on 1-D tensors: biases, norms).
* ``lr_scheduler_type`` constant | constant_with_warmup | linear | cosine | cosine_with_min_lr,
  with ``warmup_steps``, becomes a ``distzo.Schedule``; other schedules are refused. The
  warm-up ramp is distzo's: step t (from 0) runs at (t+1)/warmup of the peak, not t/warmup.
* The loss of each perturbed half is the Trainer's training loss on the batch's ``labels``:
  ``compute_loss_func`` if given, else label smoothing if set, else the model's own
  ``loss_function`` (what ``model(**batch).loss`` computes). Override ``zo_loss`` for another.
* One batch is one step: ``gradient_accumulation_steps`` must be 1. One process on one device;
  fp16/bf16 autocast, torch_compile, DeepSpeed and FSDP are refused (load the model in bf16).
* ``optim``, ``adam_*`` and ``max_grad_norm`` have nothing to act on; no grad norm is logged.

A step's update is applied lazily, during the next step's forward; the trainer flushes it
before evaluating, predicting, saving and at the end of training. Callbacks that read the
weights between those points see them one update behind (``trainer.zo.flush()`` catches up).
Checkpoints hold ``zo_state.json`` (the step count and hyper-parameters) beside the Trainer's
files, so ``train(resume_from_checkpoint=...)`` continues bit for bit.

Needs transformers 5: a few Trainer internals are overridden (TRAINER_HOOKS), and a Trainer
without them is refused rather than left to skip a flush.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import transformers

from distzo.algorithms import check_algorithm
from distzo.algorithms.mezo import validate
from distzo.directions import check_kind
from distzo.offload import OffloadConfig, OffloadEngine
from distzo.optimizer import LossFn, ZOOptimizer, current_state
from distzo.schedules import Schedule

ZO_STATE_NAME = "zo_state.json"
# Trainer internals ZOTrainer overrides to flush before the best model is loaded, to keep its
# state in checkpoints and to leave an offloaded model's placement to the engine.
TRAINER_HOOKS = ("_finalize_training", "_save_optimizer_and_scheduler", "_load_optimizer_and_scheduler",
                 "_move_model_to_device", "_build_accelerator_args")
# Trainer scheduler names whose shape distzo's Schedule has, and the shape.
SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear",
             "cosine": "cosine", "cosine_with_min_lr": "cosine"}


@dataclass
class ZOArguments:
    """The ZO step's settings; None takes the TrainingArguments value. Parses with HfArgumentParser."""

    lr: float | None = None
    """Peak learning rate; None: TrainingArguments.learning_rate (MeZO: 1e-6 or 1e-7 for full fine-tuning)."""
    eps: float = 1e-3
    """Perturbation scale: the losses are measured at theta +- eps z."""
    directions: int = 1
    """Random directions per step (q); the update averages their projected gradients."""
    perturbation: str = "gaussian"
    """gaussian | rademacher | rademacher-packed | rademacher-shared: the distribution of z (docs/directions.md)."""
    estimator: str = "two-sided"
    """two-sided (L(theta+eps z) - L(theta-eps z)) | one-sided (L(theta+eps z) - L(theta))."""
    weight_decay: float | None = None
    """None: TrainingArguments.weight_decay."""
    seed: int | None = None
    """Seed of the directions; None: TrainingArguments.seed."""
    offload: str = "none"
    """none | cpu: keep the decoder blocks in host memory and stream them through the GPU."""
    gpu_memory: str = ""
    """With offload: GPU memory budget (e.g. 18GiB); blocks that fit stay on the GPU ('' = stream all)."""
    algorithm: str = "mezo"
    """The zeroth-order algorithm (docs/algorithms.md), with its own settings at their defaults."""
    cuda_graphs: bool = False
    """Replay the forward's unit calls from CUDA graphs (resident runs on CUDA; docs/kernels.md)."""
    batch_streams: bool = False
    """Run each block once over all probes' rows, only the perturbed layers stream by stream (LoRA: the base
    once a forward; docs/kernels.md)."""

    def __post_init__(self) -> None:
        _ = self.offload_config  # a bad offload setting fails here, not at train time
        check_algorithm(self.algorithm)
        if self.cuda_graphs and self.offload_config.enabled:
            raise ValueError("cuda_graphs does not combine with offload; drop one of them")

    @property
    def offload_config(self) -> OffloadConfig:
        return OffloadConfig(self.offload, gpu_memory=self.gpu_memory)

    def resolved(self, args: transformers.TrainingArguments) -> ZOArguments:
        """These settings with every None filled in from ``args``, validated."""
        zo = replace(
            self,
            lr=args.learning_rate if self.lr is None else self.lr,
            weight_decay=args.weight_decay if self.weight_decay is None else self.weight_decay,
            seed=args.seed if self.seed is None else self.seed,
        )
        validate(zo.lr, zo.eps, zo.weight_decay, zo.directions, zo.estimator)
        check_kind(zo.perturbation)
        return zo


def schedule_from_args(args: transformers.TrainingArguments, total_steps: int) -> Schedule:
    """The Trainer's lr schedule as a distzo Schedule (a pure function of the step), or an error."""
    name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if name not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type '{name}' has no ZO equivalent; use one of {', '.join(SCHEDULES)}")
    kwargs = dict(args.lr_scheduler_kwargs or {})
    min_ratio = _min_ratio(name, kwargs, args.learning_rate)
    if kwargs:
        raise ValueError(f"lr_scheduler_kwargs {sorted(kwargs)} are not supported by ZOTrainer's '{name}' schedule")
    # Like transformers: the plain constant schedule has no warm-up.
    warmup = 0 if name == "constant" else args.get_warmup_steps(total_steps)
    shape = SCHEDULES[name]
    return Schedule(shape, warmup_steps=warmup, total_steps=None if shape == "constant" else total_steps,
                    min_ratio=min_ratio)


def _min_ratio(name: str, kwargs: dict[str, Any], lr: float) -> float:
    """cosine_with_min_lr's floor as a share of the peak (popped from ``kwargs``); 0 otherwise."""
    if name != "cosine_with_min_lr":
        return 0.0
    if "min_lr_rate" in kwargs:
        return float(kwargs.pop("min_lr_rate"))
    if "min_lr" in kwargs:
        return float(kwargs.pop("min_lr")) / lr
    raise ValueError("lr_scheduler_type 'cosine_with_min_lr' needs lr_scheduler_kwargs min_lr or min_lr_rate")


def model_loss(model) -> LossFn:
    """The model's own causal-LM loss on ``batch["labels"]`` as a ZOOptimizer ``loss_fn``."""

    def loss(outputs, batch: Mapping[str, Any]) -> torch.Tensor:
        return model.loss_function(logits=outputs.logits, labels=batch["labels"], vocab_size=model.config.vocab_size)

    return loss


class _NoOpOptimizer(torch.optim.Optimizer):
    """What the Trainer's loop steps and saves. The ZO step happens in ``training_step``; this
    holds only the learning rate, which the Trainer's scheduler sets and its logs read."""

    def __init__(self, lr: float):
        super().__init__([torch.zeros(0)], {"lr": lr})

    def step(self, closure=None):
        return None


class ZOTrainer(transformers.Trainer):
    """A transformers Trainer whose optimisation step is distzo's zeroth-order step."""

    def __init__(self, *args, zo_args: ZOArguments | None = None, **kwargs):
        self.zo_args = zo_args or ZOArguments()  # read by the overrides that super().__init__ calls
        self.zo: ZOOptimizer | None = None
        self.offload_engine: OffloadEngine | None = None
        super().__init__(*args, **kwargs)
        _refuse_unsupported(self)
        self.zo_args = self.zo_args.resolved(self.args)
        if self._offloading:
            self.offload_engine = OffloadEngine(self.model, self.args.device, self.zo_args.offload_config)

    @property
    def _offloading(self) -> bool:
        return self.zo_args.offload_config.enabled

    # ------------------------------------------------------------------ the step

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = _NoOpOptimizer(self.zo_args.lr)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Builds the ZO optimiser and a scheduler that reports its lr. The Trainer calls this once
        per train(), with the model placed and any checkpoint's weights loaded; like the Trainer's
        state, the ZO step count starts at 0 unless the checkpoint's state is loaded next."""
        self.zo = self._build_zo(schedule_from_args(self.args, num_training_steps))
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda step: self.zo.algorithm.schedule.factor(step)
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _build_zo(self, schedule: Schedule) -> ZOOptimizer:
        z = self.zo_args
        return ZOOptimizer(
            self.accelerator.unwrap_model(self.model), lr=z.lr, eps=z.eps, weight_decay=z.weight_decay,
            directions=z.directions, perturbation=z.perturbation, seed=z.seed, loss_fn=self.zo_loss,
            schedule=schedule, estimator=z.estimator, offload=self.offload_engine, algorithm=z.algorithm,
            cuda_graphs=z.cuda_graphs, batch_streams=z.batch_streams,
        )

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """One ZO step on the batch; returns the step's loss (the mean of the two perturbed losses)."""
        stats = self.zo.step(self._prepare_inputs(inputs))
        return torch.tensor(stats.loss, dtype=torch.float32, device=self.args.device)

    def zo_loss(self, outputs, batch: Mapping[str, Any]) -> torch.Tensor:
        """The loss of one perturbed half of the forward: the Trainer's training loss on the labels.
        Override for another objective (e.g. distzo.losses.candidate_loss, MeZO's classification
        loss; with remove_unused_columns=False, so that its batch keys reach it)."""
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("ZOTrainer trains on the batch's 'labels', and the data collator gave none "
                             "(for a causal LM: DataCollatorForLanguageModeling(tokenizer, mlm=False))")
        if self.compute_loss_func is not None:
            return self.compute_loss_func(outputs, labels, num_items_in_batch=None)
        if self.label_smoother is not None:
            return self.label_smoother(outputs, labels, shift_labels=True)
        return model_loss(self.accelerator.unwrap_model(self.model))(outputs, batch)

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # no gradients: a logged norm of 0 would mislead

    # ------------------------------------------------------------------ where the weights are read

    def evaluate(self, *args, **kwargs):
        self._flush()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self._flush()
        return super().predict(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._flush()
        super().save_model(output_dir, _internal_call=_internal_call)

    def _finalize_training(self, *args, **kwargs):
        self._flush()  # before the best checkpoint may replace the weights
        return super()._finalize_training(*args, **kwargs)

    def _flush(self) -> None:
        if self.zo is not None:
            self.zo.flush()

    # ------------------------------------------------------------------ checkpoints

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            with open(os.path.join(output_dir, ZO_STATE_NAME), "w", encoding="utf-8") as f:
                json.dump(self.zo.state_dict(), f, indent=2)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ZO_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{checkpoint} has no {ZO_STATE_NAME}: it was not saved by ZOTrainer (to start ZO "
                             "training from its weights, load the model from it instead of resuming)")
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        _check_same_run(state, self.zo.state_dict(), checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
        self.zo.load_state_dict(state)

    # ------------------------------------------------------------------ placement (offload)

    def _move_model_to_device(self, model, device) -> None:
        if not self._offloading:  # offloaded, the engine places each part
            super()._move_model_to_device(model, device)

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        if self._offloading:
            kwargs.setdefault("device_placement", False)
        return super()._build_accelerator_args(**kwargs)


def _refuse_unsupported(trainer: ZOTrainer) -> None:
    """One clear error for a setting a ZO step cannot honour, before anything runs."""
    args = trainer.args
    missing = [name for name in TRAINER_HOOKS if not hasattr(transformers.Trainer, name)]
    refusals = [
        (bool(missing), f"ZOTrainer needs a transformers Trainer with {', '.join(missing)} (transformers 5); "
                        f"this is transformers {transformers.__version__}"),
        (args.gradient_accumulation_steps != 1,
         f"gradient_accumulation_steps={args.gradient_accumulation_steps}: a ZO step measures one batch, so it must "
         "be 1; raise per_device_train_batch_size instead (without a backward a batch costs only forward memory)"),
        (args.world_size > 1 or args.n_gpu > 1,
         "ZOTrainer runs in one process on one device (make one GPU visible); for several GPUs run "
         "`distzo train` under torchrun"),
        (bool(args.deepspeed or args.fsdp), "ZOTrainer does not run under DeepSpeed or FSDP"),
        (args.fp16 or args.bf16,
         "fp16/bf16 mixed precision is not used by ZOTrainer: load the model in the dtype to train "
         "(dtype=torch.bfloat16); distzo applies bf16/fp16 updates with stochastic rounding"),
        (args.torch_compile, "torch_compile is not supported: the ZO step runs the model's own eager forward"),
        (args.auto_find_batch_size, "auto_find_batch_size is not supported: set per_device_train_batch_size"),
        (trainer.model_init is not None, "ZOTrainer needs the model itself: model_init is not supported"),
        (trainer.optimizer is not None or trainer.lr_scheduler is not None
         or trainer.optimizer_cls_and_kwargs is not None,
         "ZOTrainer makes its own optimizer and scheduler: pass no optimizers / optimizer_cls_and_kwargs"),
        (_overrides_compute_loss(type(trainer)),
         "ZOTrainer trains on zo_loss(outputs, batch), not compute_loss: override zo_loss instead"),
    ]
    for refused, message in refusals:
        if refused:
            raise ValueError(message)


def _overrides_compute_loss(cls: type) -> bool:
    """Whether a subclass of ZOTrainer redefines compute_loss (which the ZO step never calls)."""
    for klass in cls.__mro__:
        if klass is ZOTrainer:
            return False
        if "compute_loss" in vars(klass):
            return True
    return False


def _check_same_run(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str) -> None:
    """Resuming must not change how the run updates its weights."""
    saved = current_state(saved)
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items()
               if k not in ("step", "pending") and saved.get(k) != v]
    if changed:
        raise ValueError(f"resuming from {checkpoint} would change the ZO run's settings ({'; '.join(changed)})")
