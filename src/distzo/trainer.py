"""The training loop: data, steps, eval, metrics, checkpoints, the trajectory log, signals.

    results = train(TrainConfig())          # the offline default job

Files in ``output_dir`` (what each promises: docs/runs.md):
    .distzo.lock           held (flock) by the one process writing the run
    config.yaml            the resolved configuration
    trajectory.jsonl       (step, seeds, g's, lr) per step: with the base model, the run
    metrics.jsonl, tb/     training and eval metrics (JSON lines; TensorBoard or the other --report-to loggers)
    checkpoints/last/      weights (save_pretrained) + trainer and optimizer state + model card (README.md)
    checkpoints/best/      the best dev-metric checkpoint, when evaluating during training
    results.json           zero-shot and final metrics, wall time
    launch.json            the torchrun launch that wrote the run (to resume it after a restart)

Under torchrun every rank runs this loop on its shard of the same global batch
(``distzo.parallel``) and scores its share of each evaluation (``distzo.evaluate``); rank 0
alone writes files.

Nothing is written before every check has passed: a refused run or resume leaves the folder
as it was. ``--resume`` continues from ``checkpoints/last`` or, when the run stopped before
its first checkpoint, from the base model and the trajectory log (replayed).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from distzo import algorithms, loggers, parallel, rundir
from distzo.checkpoint import (
    BaseIdentity,
    TrajectoryHeader,
    TrajectoryLog,
    atomic_write_json,
    atomic_write_text,
    json_lines,
    load_checkpoint_state,
    readable_checkpoint,
    save_checkpoint,
)
from distzo.config import TrainConfig, dump_yaml, run_config, to_dict
from distzo.environment import describe
from distzo.evaluate import evaluate
from distzo.first_order import TENSORS_FILE, FirstOrder, read_tensors
from distzo.losses import default_loss
from distzo.modelcard import CARD_FILE, model_card
from distzo.models import apply_lora, checkpoint_files, load_model, quantization_settings, resolve_device
from distzo.offload import OffloadEngine
from distzo.optimizer import StepStats, ZOOptimizer
from distzo.replay import check_base, check_replayable, check_steps, replay_into
from distzo.tasks import get_task, load_task
from distzo.tasks.collate import collate_train
from distzo.upload import push

# The metric each task kind selects the best checkpoint by, and whether higher is better.
SELECT_BY = {"classification": ("accuracy", True), "generation": ("f1", True), "lm": ("loss", False)}
LAUNCH_FILE = "launch.json"
METRICS_FILE = "metrics.jsonl"


class Interrupted(Exception):
    """Raised out of ``train`` after SIGINT/SIGTERM, once the last checkpoint is saved."""

    def __init__(self, signum: int, step: int, saved: bool):
        kept = "the checkpoint is saved" if saved else "nothing new to save"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {kept}; --resume continues the run")
        self.signum = signum


class _StopNow(Exception):
    """A signal arrived during an evaluation, which is cut short (it changes nothing)."""


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for too many consecutive steps."""


def build_model(cfg: TrainConfig, checkpoint: Path | None = None, skeleton: bool = False):
    """The model as the run trains it: base weights, then LoRA adapters seeded by the run.

    From a checkpoint: its full weights, or for LoRA the base model with its adapter.
    An offloaded model is loaded into host memory (the engine moves what stays resident);
    a ``skeleton`` holds no weights (a sliced-offload rank that gets them from its node's first rank).
    """
    model_cfg = replace(cfg.model, device="cpu") if cfg.offload.enabled else cfg.model
    computes_on = resolve_device(cfg.model.device) if cfg.model.base_compute else None  # for the fp8 check
    if checkpoint is not None and not cfg.use_lora:
        return load_model(replace(model_cfg, name=str(checkpoint)), skeleton=skeleton, compute_device=computes_on)
    model, tokenizer = load_model(model_cfg, skeleton=skeleton and not cfg.use_lora, compute_device=computes_on)
    if cfg.use_lora and checkpoint is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, checkpoint / "adapter", is_trainable=True), tokenizer
    if cfg.use_lora:
        torch.manual_seed(cfg.seed)  # adapter init is random: replay must redo it identically
        model = apply_lora(model, cfg.lora)
    return model, tokenizer


def trajectory_header(cfg: TrainConfig, model=None, environment: dict | None = None) -> TrajectoryHeader:
    """The log's header for ``model`` as built at step 0; without a model, the settings alone
    (what a resumed run's log is checked against: it keeps its own step-0 header)."""
    extra: dict[str, Any] = {"revision": cfg.model.revision}
    if cfg.use_lora:
        extra["lora"] = asdict(cfg.lora)
    if cfg.model.quantize is not None:  # replay rebuilds the quantized base from this record
        extra["quantize"] = quantization_settings(cfg.model.quantize, cfg.model.dtype, cfg.model.quantize_on,
                                                  cfg.model.double_quant, cfg.model.base_compute)
    if cfg.optim.first_order:  # so replay can tell that the log alone does not rebuild the run
        extra["first_order"] = {"patterns": cfg.optim.first_order, "lr": cfg.optim.first_order_lr,
                                "weight_decay": cfg.optim.first_order_weight_decay}
    return TrajectoryHeader(
        model=cfg.model.name,
        perturbation=cfg.optim.perturbation,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        seed=cfg.seed,
        q=cfg.optim.directions,
        dtype=cfg.model.dtype,
        algorithm=cfg.optim.algorithm,
        algorithm_settings=algorithms.build(cfg.optim, cfg.seed, cfg.steps).settings(),
        extra=extra,
        # rank 0 writes the log and holds weights, also in sliced offload
        base=None if model is None else BaseIdentity.of(model),
        environment=environment,
    )


def build_optimizer(cfg: TrainConfig, model, mesh: parallel.Mesh | None = None,
                    offload: OffloadEngine | None = None) -> ZOOptimizer:
    """The run's ZOOptimizer, from its config (the trainer and the benchmarks build it alike)."""
    return ZOOptimizer(
        model,
        perturbation=cfg.optim.perturbation,
        loss_fn=lambda outputs, batch: default_loss(outputs.logits, batch),
        mesh=mesh,
        offload=offload,
        algorithm=algorithms.build(cfg.optim, cfg.seed, cfg.steps),
        first_order=build_first_order(cfg, model),
        cuda_graphs=cfg.optim.cuda_graphs,
        batch_streams=cfg.optim.batch_streams,
    )


def build_first_order(cfg: TrainConfig, model) -> FirstOrder | None:
    """The optim.first_order parameters' AdamW; None when every trainable parameter is ZO's.
    Built after the offload engine has placed the weights: it holds the parameters it steps."""
    if not cfg.optim.first_order:
        return None
    return FirstOrder.select(model, cfg.optim.first_order, lr=cfg.optim.first_order_lr,
                             weight_decay=cfg.optim.first_order_weight_decay)


def _config_text(cfg: TrainConfig, environment: dict[str, Any]) -> str:
    """config.yaml: the settings, under comment lines naming what the run's bits depend on."""
    stack = ", ".join(f"{k} {v}" for k, v in environment.items() if v is not None)
    return f"# written by distzo; ran on: {stack}\n" + dump_yaml(cfg)


class BatchStream:
    """Step t's batch is a pure function of (seed, t): a fresh permutation per epoch.

    With ``group_by_length``, each run of 8 batches of the permutation is sorted by prompt
    length, so a batch holds examples of similar length and pads less (padding costs as
    much compute as real tokens); which examples share the 8 batches stays random.
    """

    GROUP = 8

    def __init__(self, examples: list, batch_size: int, seed: int, group_by_length: bool = False):
        if not examples:
            raise ValueError("the training split is empty")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.group_by_length = group_by_length
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(len(self.examples)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            if self.group_by_length:
                order = self._grouped(order)
            self._perms = {epoch: order}  # keep one epoch: steps only move forward
        return self._perms[epoch]

    def _grouped(self, order: list[int]) -> list[int]:
        span = self.GROUP * self.batch_size
        length = lambda i: _text_length(self.examples[i])  # noqa: E731
        return [i for lo in range(0, len(order), span) for i in sorted(order[lo : lo + span], key=length)]

    def at(self, step: int) -> list:
        n = len(self.examples)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self.examples[self._perm(p // n)[p % n]] for p in positions]


def _text_length(example) -> int:
    return len(example.prompt) + len(example.target or "") + sum(len(m.get("content") or "") for m in example.messages)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.out = Path(cfg.output_dir)
        self.last_dir = self.out / "checkpoints" / "last"
        self.best_dir = self.out / "checkpoints" / "best"
        self.mesh = parallel.init(cfg.parallel, cfg.model.device)
        self._folder = rundir.inspect(self.out)
        self._restarted = _restart_of_this_launch(self.out)
        if self._restarted and self._folder.kind == "run":
            cfg = replace(cfg, resume=True)  # torchrun restarted the job: go on from where it stopped
        self.cfg = cfg
        data_ranks = self.mesh.size("data")
        if cfg.batch_size < data_ranks:
            raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {data_ranks} data ranks")
        self.lock = rundir.RunLock(self.out)
        if self.mesh.is_main:
            self.lock.probe()  # a second writer is refused before a model is loaded
        self._check_folder(self._folder)
        self.log = TrajectoryLog(self.out / rundir.LOG_FILE)
        if cfg.model.quantize is not None:  # where bitsandbytes makes the base's bits: settled once, recorded
            self.cfg = cfg = replace(cfg, model=replace(cfg.model, quantize_on=self._quantize_on(cfg)))
        self.changes = self._resume_changes() if cfg.resume else {}
        self.task = get_task(cfg.task.name)
        self.data = load_task(cfg.task)
        self.state: dict[str, Any] = {"step": 0, "best": None, "zero_shot": None}
        saved, records = self._resume_point() if cfg.resume else (None, [])
        if saved:
            self.state = saved["trainer_state"]
        elif cfg.resume:
            self.state = self._state_from_log(records)
        self._saved_step = self.state["step"]
        # the last logged step record: a checkpoint keeps it, so a resume can check the log still has it
        self._tail: dict[str, Any] | None = records[self.state["step"] - 1] if self.state["step"] else None
        # Offloaded under torchrun: the ranks of a node share one host copy, which the node's
        # first rank loads; the others build the model without weights (no P copies in host memory).
        slices = parallel.node_slices(self.mesh) if cfg.offload.enabled else None
        skeleton = slices is not None and slices.rank != 0 and not cfg.use_lora
        self.model, self.tokenizer = build_model(cfg, Path(saved["path"]) if saved else None, skeleton)
        # Data the tokenizer cannot batch (a chat task and a model without a chat template) is
        # refused now, before anything is written, not at the first step.
        if self.data.train:
            collate_train(self.data.train[:1], self.tokenizer, self.task.kind, cfg.task.max_length)
        if cfg.resume and not saved and not skeleton:  # stopped before its first checkpoint: the log rebuilds it
            header = self.log.header()
            check_base(self.model, header, cfg.model.name)
            replay_into(self.model, header, records)
        self.engine = None
        if cfg.offload.enabled:
            self.engine = OffloadEngine(self.model, resolve_device(cfg.model.device), cfg.offload, slices=slices)
        # With sliced offload every forward is collective: the ranks evaluate in lockstep.
        self._lockstep = self.engine is not None and self.engine.slices is not None
        self.opt = build_optimizer(cfg, self.model, self.mesh, self.engine)
        self.stream = BatchStream(self.data.train, cfg.batch_size, cfg.seed, cfg.group_by_length)
        if self.opt.first_order is not None and self.mesh.is_main:
            print(self.opt.first_order.describe())
        if saved:
            self.opt.load_state_dict(saved["optimizer_state"], read_tensors(Path(saved["path"])))
        elif cfg.resume:  # the log rebuilt the weights; it rebuilds the algorithm's state too
            self.opt.load_state_dict({**self.opt.state_dict(), "step": self.state["step"]})
            self.opt.algorithm.restore(records)
        algorithms.check_seeds(self.opt.algorithm, self._tail)
        self._signal: int | None = None
        self._evaluating = False
        self._eval_seconds = 0.0  # spent evaluating in this process, for the log line and results.json
        self._last_eval_seconds: float | None = None  # shown in the progress bar
        self._began = time.time()
        self._bar = None
        self._loggers = loggers.Loggers()

    # ------------------------------------------------------------------ setup (reads only)

    def _check_folder(self, folder: rundir.FolderState) -> None:
        if self.cfg.resume:
            if folder.kind != "run":
                raise FileNotFoundError(f"--resume: no run to continue in '{self.out}'")
            rundir.require_writable(self.out)
            return
        if folder.kind == "run":
            raise FileExistsError(
                f"output directory '{self.out}' already holds a run; pass --resume to continue it "
                "or choose another --output-dir"
            )
        if folder.kind == "other":
            raise FileExistsError(
                f"output directory '{self.out}' holds files but no distzo run; choose an empty or new --output-dir"
            )
        if folder.kind == "empty":
            rundir.require_writable(self.out)

    def _quantize_on(self, cfg: TrainConfig) -> str | None:
        """Where the base is quantized: where the resumed run's log says (None in an older log, which did
        not say), else as asked, else where the model loads (an offloaded one: into host memory)."""
        if cfg.resume and self._folder.has_log:
            recorded = self.log.header().extra.get("quantize")
            if isinstance(recorded, dict):
                return cfg.model.quantize_on or recorded.get("quantized_on")
        return cfg.model.quantize_on or ("cpu" if cfg.offload.enabled else resolve_device(cfg.model.device).type)

    def _resume_changes(self) -> dict[str, list]:
        """The settings this resume changes, checked against the run's own config.yaml."""
        run = run_config(self.out)
        if run is None:
            return {}  # no config.yaml: the log header still guards the update rule
        accepted, refused = rundir.changed_settings(to_dict(run), to_dict(self.cfg))
        if refused:
            what = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in refused.items())
            raise ValueError(
                f"--resume: {what} cannot change when a run resumes (the trajectory would no longer describe "
                f"one run); drop those settings or start a new run in another --output-dir"
            )
        return accepted

    def _resume_point(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """(the last checkpoint's state or None, the logged step records), checked to agree."""
        records = self.log.read() if self._folder.has_log else []
        if records:
            try:
                check_steps(records)
            except ValueError as exc:
                raise ValueError(f"--resume: {self.log.path}: {exc}") from None
        if not _has_checkpoint(self.last_dir):
            if not self._folder.has_log:
                raise FileNotFoundError(f"--resume: '{self.out}' holds neither a checkpoint nor a trajectory log")
            check_replayable(self.log.header(), f"the trajectory log alone cannot rebuild it and '{self.out}' holds "
                             "no checkpoint; start the run again in another --output-dir")
            return None, records
        saved = load_checkpoint_state(self.last_dir)
        step = saved["trainer_state"]["step"]
        if len(records) < step:
            raise ValueError(
                f"--resume: {self.log.path} holds {len(records)} steps but the checkpoint in {self.last_dir} is at "
                f"step {step}, so the log no longer rebuilds it; restore the log, or start a new run from the "
                "checkpoint (--model) in another --output-dir"
            )
        tail = saved["trainer_state"].get("log_tail")
        if step and tail and not _same_record(records[step - 1], tail):
            raise ValueError(
                f"--resume: step {step - 1} of {self.log.path} is not the step the checkpoint in {self.last_dir} "
                "was saved after; the log and the checkpoint come from different runs"
            )
        return saved, records

    def _state_from_log(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The trainer state of a run that stopped before its first checkpoint."""
        state: dict[str, Any] = {"step": len(records), "best": None, "zero_shot": None}
        for row in _read_metrics(self.out / METRICS_FILE):
            if row.get("split") == "zero_shot" and row["step"] == 0:
                state["zero_shot"] = {k: v for k, v in row.items() if k not in ("step", "split", "eval_seconds")}
        if _has_checkpoint(self.best_dir):
            best = load_checkpoint_state(self.best_dir)["trainer_state"]
            if best["step"] <= state["step"]:
                state["best"] = best.get("best")
        return state

    # ------------------------------------------------------------------ setup (writes)

    def _open(self) -> None:
        """Rank 0 opens the run's files; every rank learns whether it could."""
        error = None
        if self.mesh.is_main:
            try:
                self._start()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
                error = exc
        if self.mesh.distributed:
            failed = self.mesh.all_reduce_sum(torch.tensor([float(error is not None)], dtype=torch.float64))
            if failed[0] > 0 and error is None:
                raise ValueError("rank 0 could not open the run's output folder (its error line says why)")
        if error is not None:
            raise error

    def _start(self) -> None:
        """Rank 0: lock the folder, then create or reopen the run's files."""
        self.lock.acquire()  # creates the folder of a new run
        self._check_folder(rundir.inspect(self.out))  # another run may have started in it meanwhile
        if self._restarted:
            print(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming at step {self.state['step']}")
        if self.cfg.resume:  # an existing log is only checked here; it keeps its step-0 header
            self.log.start(trajectory_header(self.cfg))
        environment = describe(resolve_device(self.cfg.model.device), quantized=self.cfg.model.quantize is not None)
        atomic_write_text(self.out / rundir.CONFIG_FILE, _config_text(self.cfg, environment))
        atomic_write_json(self.out / LAUNCH_FILE, _launch_record(self.mesh))
        if self.cfg.resume:  # steps logged after the checkpoint will be redone identically
            self.log.truncate_after(self.state["step"] - 1)
            if self.changes:
                self.log.append_event("resume", self.state["step"], changes=self.changes)
        else:
            self.log.start(trajectory_header(self.cfg, self.model, environment))
        self._trim_metrics()
        self._loggers = loggers.start(self.cfg.report_to, self.out, to_dict(self.cfg))

    def _trim_metrics(self) -> None:
        """After a resume, drop metric lines past the resumed step: they will be redone."""
        path = self.out / METRICS_FILE
        if path.exists():
            keep = [row for row in _read_metrics(path) if row["step"] <= self.state["step"]]
            atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))

    # ------------------------------------------------------------------ loop

    def run(self) -> dict[str, Any]:
        start_time = self._began = time.time()
        self.mesh.barrier()  # every rank has read the output folder before rank 0 writes to it
        self._open()
        cfg = self.cfg
        previous = _install_signal_handlers(self._on_signal)
        try:
            if cfg.zero_shot and self.state["zero_shot"] is None:
                self.state["zero_shot"] = self._evaluate(self.data.test, "zero_shot")
                self.mesh.barrier()
            self._loop(start_time)
            self.opt.flush()
            final = self._evaluate(self.data.test, "test")
            self._save(self.last_dir, final=final)
        except _StopNow:
            self._interrupt()
        finally:
            _restore_signal_handlers(previous)
        best = self.state["best"]
        results = {
            "task": cfg.task.name,
            "model": cfg.model.name,
            "steps": self.state["step"],
            "zero_shot": self.state["zero_shot"],
            "final": final,
            "best_dev": best,
            "test_at_best_dev": (best or {}).get("test"),
            "test_examples": len(self.data.test),
            "wall_seconds": round(time.time() - start_time, 1),
            "eval_seconds": round(self._eval_seconds, 1),
        }
        if self.mesh.is_main:
            atomic_write_json(self.out / "results.json", results)
            if cfg.push_to_hub:  # after the run's own files: a failed upload loses nothing
                folder = self.best_dir if cfg.push_checkpoint == "best" else self.last_dir
                print(f"uploaded {folder} to {push(folder, cfg.push_to_hub)}")
        self.close()
        return results

    def close(self) -> None:
        self.log.close()
        self._loggers.close()
        self.lock.release()

    def _loop(self, start_time: float) -> None:
        cfg = self.cfg
        deadline = start_time + cfg.time_limit_minutes * 60 if cfg.time_limit_minutes else math.inf
        bar = self._bar = _progress(cfg, self.state["step"]) if self.mesh.is_main else None
        skipped_in_row = 0
        window = _Window()
        while self.state["step"] < cfg.steps:
            t = self.state["step"]
            batch = collate_train(self.stream.at(t), self.tokenizer, self.task.kind, cfg.task.max_length,
                                  pad_to_multiple_of=cfg.task.pad_to_multiple_of)
            stats = self.opt.step(parallel.shard_batch(batch, self.mesh.coord("data"), self.mesh.size("data")))
            if self.mesh.is_main:
                self._tail = self.log.append_update(stats.update, stats.loss, skipped=stats.skipped, **stats.log)
            self.state["step"] = t + 1
            window.add(stats, int(batch["attention_mask"].sum()) * 2 * cfg.optim.directions)
            skipped_in_row = skipped_in_row + 1 if stats.skipped else 0
            if skipped_in_row > cfg.max_skipped_steps:
                raise TrainingDiverged(
                    f"the loss was non-finite for {skipped_in_row} steps in a row (lower optim.lr or optim.eps); "
                    f"the last checkpoint, if any, is kept in {self.last_dir}"
                )
            rate = window.tokens_per_s()
            if (t + 1) % cfg.log_every == 0 or t + 1 == cfg.steps:
                self._metric({"step": t + 1, **window.summary(), "grad": stats.projected_grads[0], "lr": stats.lr})
                window = _Window()
            _advance(bar, stats, rate, self._last_eval_seconds)
            self._maybe_eval_and_save(t + 1)
            signalled, out_of_time = self._should_stop(deadline)
            if signalled:
                self._interrupt()
            if out_of_time:
                if self.mesh.is_main:
                    print(f"time limit of {cfg.time_limit_minutes} min reached after {t + 1} steps")
                break
        if bar is not None:
            bar.close()
        self._bar = None

    def _interrupt(self) -> None:
        """Save what was trained since the last checkpoint, then stop."""
        self._evaluating = False
        unsaved = self.state["step"] > self._saved_step
        if unsaved:
            self._save(self.last_dir)
        raise Interrupted(self._signal or signal.SIGTERM, self.state["step"], unsaved)

    def _should_stop(self, deadline: float) -> tuple[bool, bool]:
        """(a signal arrived, the time limit passed) on any rank: all ranks stop at the same step."""
        flags = torch.tensor([self._signal is not None, time.time() > deadline], dtype=torch.float64)
        if self.mesh.distributed:
            flags = self.mesh.all_reduce_sum(flags)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _maybe_eval_and_save(self, step: int) -> None:
        cfg = self.cfg
        if cfg.eval_every and step % cfg.eval_every == 0:
            self.opt.flush()
            metrics = self._evaluate(self.data.dev, "dev")
            if metrics and self._improves(metrics):
                # MeZO's protocol reports test at the best dev checkpoint: score it while it is loaded.
                test = self._evaluate(self.data.test, "test_at_best_dev") if cfg.test_at_best else None
                self.state["best"] = {**metrics, "step": step, **({"test": test} if test else {})}
                if self.mesh.is_main:
                    self._save(self.best_dir, wait=False)
            self._save(self.last_dir)
        elif cfg.save_every and step % cfg.save_every == 0:
            self._save(self.last_dir)

    def _improves(self, metrics: dict[str, float]) -> bool:
        name, higher = SELECT_BY[self.task.kind]
        best = self.state["best"]
        return best is None or (metrics[name] > best[name] if higher else metrics[name] < best[name])

    def _evaluate(self, examples, split: str) -> dict[str, float]:
        """The split's metrics, every rank scoring its share (the weights are the same on every rank)."""
        if not examples:
            return {}
        began = time.time()
        self._evaluating = True
        try:
            metrics = evaluate(self.model, self.tokenizer, self.task, examples, self.cfg.eval_batch_size,
                               self.cfg.task.max_length, mesh=self.mesh, lockstep=self._lockstep)
        finally:
            self._evaluating = False
        seconds = time.time() - began
        self._eval_seconds += seconds
        self._last_eval_seconds = seconds
        self._metric({"step": self.state["step"], "split": split, **metrics, "eval_seconds": round(seconds, 3)})
        self._report_eval(split, metrics, seconds)
        return metrics

    def _report_eval(self, split: str, metrics: dict[str, float], seconds: float) -> None:
        """One line per evaluation with its time and evaluation's share of the run so far, so that
        a run whose evaluations dominate shows it."""
        if not self.mesh.is_main or not self.cfg.progress:
            return
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        share = self._eval_seconds / max(time.time() - self._began, 1e-9)
        line = (f"eval {split} at step {self.state['step']}: {shown} in {seconds:.1f} s "
                f"(evaluation is {share:.0%} of the run's time so far)")
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def _save(self, directory: Path, wait: bool = True, final: dict[str, float] | None = None) -> None:
        """Rank 0 writes the checkpoint and its model card (``final``: the test metrics after the last
        step, once known); with ``wait`` every rank waits until it is written."""
        self.opt.flush()
        trained = self.opt.params + (self.opt.first_order.params if self.opt.first_order is not None else [])
        if not all(torch.isfinite(p.param).all() for p in trained):
            raise TrainingDiverged(
                f"the weights became non-finite by step {self.state['step']} (lower optim.lr); "
                f"not saving over the checkpoint in {directory}"
            )
        if self.mesh.is_main:
            state = {**self.state, "log_tail": _record_key(self._tail)}
            files = {CARD_FILE: model_card(self.cfg, self.state, final), **checkpoint_files(self.cfg.model)}
            tensors = {} if self.opt.first_order is None else {TENSORS_FILE: self.opt.first_order.tensors()}
            save_checkpoint(directory, self.model, self.tokenizer, state, self.opt.state_dict(),
                            merged=self.cfg.model.quantize is None, extra_files=files, tensor_files=tensors)
        if directory == self.last_dir:
            self._saved_step = self.state["step"]
        if wait:
            self.mesh.barrier()

    def _metric(self, row: dict[str, Any]) -> None:
        if not self.mesh.is_main:
            return
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self._loggers.log(loggers.scalars(row), row["step"])

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:  # a second signal: stop now (checkpoints and the log are atomic)
            raise KeyboardInterrupt
        self._signal = signum
        # One process cuts an evaluation short; under torchrun the others would wait for it,
        # so there the stop comes at the next step.
        if self._evaluating and not self.mesh.distributed:
            raise _StopNow


class _Window:
    """What the steps between two logging steps add up to."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.skipped, self.tokens, self.began = 0, 0, time.time()

    def add(self, stats: StepStats, tokens: int) -> None:
        self.tokens += tokens
        if stats.skipped:
            self.skipped += 1
        else:
            self.losses.append(stats.loss)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.time() - self.began, 1e-9)

    def summary(self) -> dict[str, float]:
        """The mean training loss over the window (one batch is noise), the last batch's, the rate."""
        mean = sum(self.losses) / len(self.losses) if self.losses else math.nan
        last = self.losses[-1] if self.losses else math.nan
        return {"loss": mean, "loss_last": last, "skipped": self.skipped, "tokens_per_s": self.tokens_per_s()}


def train(cfg: TrainConfig) -> dict[str, Any]:
    trainer = Trainer(cfg)
    broken = False
    try:
        return trainer.run()
    except parallel.ParallelError:
        broken = True  # a group that lost a peer cannot be torn down in order: the process exits
        raise
    finally:
        trainer.close()
        if not broken:
            trainer.mesh.close()


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a torn last line (a crash mid-write) is dropped, as in the trajectory log."""
    return json_lines(path)[0] if path.is_file() else []


def _record_key(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What identifies a logged step: a checkpoint keeps it, resume checks the log still has it."""
    if record is None:
        return None
    return {"step": record["step"], "seeds": [str(s) for s in record["seeds"]], "grads": list(record["grads"])}


def _same_record(record: dict[str, Any], key: dict[str, Any]) -> bool:
    return _record_key(record) == {**key, "seeds": [str(s) for s in key["seeds"]]}


def _has_checkpoint(directory: Path) -> bool:
    try:
        readable_checkpoint(directory)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _launch_record(mesh: parallel.Mesh) -> dict[str, Any]:
    return {"run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "world_size": mesh.world_size, "mesh": mesh.sizes}


def _restart_of_this_launch(out: Path) -> bool:
    """Whether torchrun restarted the job that wrote ``out`` (not a new job pointed at an old folder)."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return False
    try:
        launch = json.loads((out / LAUNCH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return launch.get("run_id") == os.environ.get("TORCHELASTIC_RUN_ID")


# ---------------------------------------------------------------- helpers


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="distzo", unit="step", dynamic_ncols=True)


def _advance(bar, stats: StepStats, tokens_per_s: float, eval_seconds: float | None) -> None:
    if bar is None:
        return
    last_eval = {} if eval_seconds is None else {"eval_s": f"{eval_seconds:.1f}"}
    bar.set_postfix(loss=f"{stats.loss:.4f}", g=f"{stats.projected_grads[0]:+.3g}", tok_s=f"{tokens_per_s:.0f}",
                    **last_eval, refresh=False)
    bar.update(1)


def _install_signal_handlers(handler):
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    return previous


def _restore_signal_handlers(previous) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
