"""Where a run reports its metrics besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

    distzo train --report-to tensorboard,wandb      # several at once; none: metrics.jsonl alone

Each logger is its library's own client behind one interface: the hyper-parameters once at the
start (the resolved config, flattened to dotted keys), then scalars by step, then ``close``.
Rank 0 alone logs. Every logger names the scalars ``<split>/<metric>`` (``train/loss``,
``dev/accuracy``, ``zero_shot/accuracy``). wandb and mlflow are optional extras
(``pip install 'distzo[wandb]'``) and take their settings from their own environment:
``WANDB_PROJECT``, ``WANDB_MODE=offline`` (the run is written under the run's ``wandb/``);
``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``. A resumed run is a new wandb or MLflow run
of the same name; TensorBoard adds an event file to ``tb/``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any, Protocol

from distzo.rundir import flatten

NONE = "none"
PROJECT = "distzo"  # wandb project and MLflow experiment unless their environment names one


class Logger(Protocol):
    def log_hparams(self, values: dict[str, Any]) -> None: ...

    def log(self, row: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check(names: list[str]) -> list[str]:
    """``names`` if each is a known logger whose package is installed, or ``none`` alone."""
    if names == [NONE]:
        return names
    known = ", ".join(LOGGERS)
    if not names or NONE in names or len(set(names)) != len(names):
        raise ValueError(f"report_to names each logger once, of {known}, or none alone; got {','.join(names)!r}")
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"report_to: unknown logger {name!r}; known: {known}, none")
        logger = LOGGERS[name]
        if importlib.util.find_spec(logger.package) is None:  # before the run writes anything
            raise ModuleNotFoundError(f"report_to {name} needs the package '{logger.package}': {logger.install}")
    return names


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as the loggers' scalars: ``<split>/<metric>``, training rows as ``train``."""
    prefix = row.get("split", "train")
    return {f"{prefix}/{k}": v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as flat ``section.field`` keys; lists as the flags take them (a,b)."""
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flatten(config).items()}


def start(names: list[str], out: Path, config: dict[str, Any]) -> Loggers:
    """Open the loggers ``names`` for the run in ``out`` and log its hyper-parameters."""
    loggers, values = Loggers(), hparams(config)
    for name in names if names != [NONE] else []:
        try:
            logger = LOGGERS[name](out)
            loggers.members.append(logger)
            logger.log_hparams(values)
        except Exception as exc:  # noqa: BLE001 - credentials, servers, URIs: each library its own error
            loggers.close()
            # What to do comes first: an error line shows the first line of the message alone.
            raise ValueError(f"could not start the {name} logger (fix it and continue the run with --resume, or "
                             f"leave {name} out of --report-to): {str(exc).strip() or type(exc).__name__}") from exc
    return loggers


class Loggers:
    """Every logger of a run, as one."""

    def __init__(self) -> None:
        self.members: list[Logger] = []

    def log_hparams(self, values: dict[str, Any]) -> None:
        for logger in self.members:
            logger.log_hparams(values)

    def log(self, row: dict[str, float], step: int) -> None:
        for logger in self.members:
            logger.log(row, step)

    def close(self) -> None:
        members, self.members = self.members, []  # closed once, also when closed again
        for logger in members:
            logger.close()


class TensorBoard:
    package, install = "tensorboard", "pip install tensorboard"

    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tb"))

    def log_hparams(self, values: dict[str, Any]) -> None:
        # Into the run's own folder, not add_hparams' timestamped subfolder: the HParams
        # dashboard pairs the values with the scalars of the same folder.
        self.writer.add_hparams(values, {}, run_name=".")

    def log(self, row: dict[str, float], step: int) -> None:
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    package, install = "wandb", "pip install 'distzo[wandb]'"

    def __init__(self, out: Path):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=out.resolve().name, dir=str(out))

    def log_hparams(self, values: dict[str, Any]) -> None:
        self.run.config.update(values)

    def log(self, row: dict[str, float], step: int) -> None:
        self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """Through ``MlflowClient``, not the fluent API: a run of distzo inside a user's script
    leaves that script's active MLflow run alone."""

    package, install = "mlflow", "pip install 'distzo[mlflow]'"  # mlflow-skinny: the client alone

    def __init__(self, out: Path):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=out.resolve().name).info.run_id

    def log_hparams(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in values.items()])

    def log(self, row: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in row.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


LOGGERS: dict[str, type] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow}
