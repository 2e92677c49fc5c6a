"""The convergence benchmark: ZO arms against first-order baselines, in one process, on one device.

    PYTHONPATH=src python bench/convergence.py run --task debates --out results/ \\
        --set task.num_train=296,task.num_dev=100,task.num_test=200,eval_batch_size=100 \\
        --arm zo:zo:steps=3000,eval_every=150 --grid zo:lr=1e-5,3e-5,1e-4 \\
        --arm zo-q4:zo:q=4,steps=750,eval_every=50,lr=3e-5 \\
        --arm ft:adamw --grid ft:lr=1e-5,3e-5,1e-4 \\
        --arm ft-lora:adamw:lora=true --grid ft-lora:lr=1e-4,3e-4,1e-3 \\
        --seeds 0,1,2 --target-arm zo --time-budget-s 540
    PYTHONPATH=src python bench/convergence.py summarize results-1/ results-2/ --target-arm zo --out merged/

The base model (``--model``, default the packaged SmolLM2-135M-Instruct) is loaded once; every
run trains a fresh copy of its weights. An arm is ``NAME:FAMILY[:SETTINGS]``:

  zo      distzo's ZO-SGD: ZOOptimizer, BatchStream and collate_train as ``distzo train`` builds
          them, so a run's step losses are those ``distzo train`` logs for the same settings.
  adamw   first-order baseline (here only: the library stays forward-only): AdamW by backprop
          on the same batches and the same loss (distzo.losses.default_loss), MeZO's fine-tuning
          protocol: ``epochs`` (5) over the training split, linear decay; ``lora=true`` for LoRA.

SETTINGS are ``key=value`` pairs in ``distzo train``'s names (``lr``, ``eps``, ``directions`` or
``q``, ``optim.schedule``, ``steps``, ``eval_every``, ``lora.r``, ...), over ``--set`` (all arms).
``--grid [NAME:]key=v1,v2,...`` tries each value with the first seed; the point with the best dev
score then runs with the other seeds. A run with seed s also samples its train/dev split with
task.seed = s; the test split is the same for every seed.

A run is evaluated on dev at step 0 and every ``eval_every`` steps (default steps / 20), and on
test at each new best dev (MeZO's protocol: test at the best dev checkpoint). Outputs in --out:
  evals.jsonl    one line per evaluation: step, forward and backward passes so far (forwards of
                 the batch: 2 per direction per ZO step, whichever estimator; 1 + 1 per AdamW
                 step), training seconds (device-synchronised, evaluations excluded), wall
                 seconds, mean training loss since the last evaluation, dev and test metrics
  runs.jsonl     one line per run: its settings, best dev, test at best dev, how it ended
  summary.json   per arm: the grid, the chosen point, mean and standard deviation over seeds of
                 best dev and test at best dev, and the passes and seconds until the dev score
                 first reaches the target (--target, or the best dev of --target-arm)
  dev_vs_passes.png, dev_vs_seconds.png   with matplotlib, where it is installed

``--time-budget-s`` stops the run in progress at the budget (it is kept, marked incomplete) and
skips runs the budget has no room for; ``summarize`` merges the folders of several invocations.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import product
from pathlib import Path
from typing import Any, Callable

import torch

from distzo.cli import ALIASES
from distzo.config import OptimConfig, TrainConfig, load_config
from distzo.evaluate import evaluate
from distzo.losses import default_loss
from distzo.models import apply_lora, load_model
from distzo.optimizer import MODEL_INPUTS
from distzo.tasks import TaskData, get_task, load_task
from distzo.tasks.collate import collate_train
from distzo.trainer import SELECT_BY, BatchStream, build_optimizer

FAMILIES = ("zo", "adamw")
SHORT_KEYS = {**ALIASES, "q": "optim.directions"}
OPTIM_KEYS = {f.name for f in fields(OptimConfig)}
ZO_ONLY = {"optim.eps", "optim.directions", "optim.perturbation", "optim.estimator"}
FIRST_ORDER_DEFAULTS = {"optim.schedule": "linear"}  # MeZO's fine-tuning baselines decay linearly
EPOCHS = 5
EVALUATIONS = 20  # per run, when an arm sets no eval_every
# A list of settings splits at the commas that start a new "key=": values keep theirs (q_proj,v_proj).
NEXT_SETTING = re.compile(r",(?=[\w.-]+=)")
# A backward pass costs about two forwards: the x axis on which both families are compared.
BACKWARD_IN_FORWARDS = 2


# ---------------------------------------------------------------- arms and their settings


def dotted(key: str) -> str:
    """A setting's name in TrainConfig: the CLI's short flags, optim's fields by their own name."""
    key = key.replace("-", "_")
    if key in SHORT_KEYS:
        return SHORT_KEYS[key]
    return f"optim.{key}" if key in OPTIM_KEYS else key


def parse_settings(text: str) -> dict[str, str]:
    settings = {}
    for part in NEXT_SETTING.split(text) if text else []:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {part!r} is not key=value")
        settings[dotted(key)] = value
    return settings


@dataclass
class Arm:
    name: str
    family: str
    settings: dict[str, str]
    grid: dict[str, list[str]] = field(default_factory=dict)

    def points(self) -> list[dict[str, str]]:
        """The arm's settings with each combination of the grid's values (one point without a grid)."""
        keys = sorted(self.grid)
        return [{**self.settings, **dict(zip(keys, values))} for values in product(*(self.grid[k] for k in keys))]


def parse_arm(text: str) -> Arm:
    name, _, rest = text.partition(":")
    family, _, settings = rest.partition(":")
    if not name or family not in FAMILIES:
        raise ValueError(f"arm {text!r} is not NAME:FAMILY[:SETTINGS] with FAMILY one of {', '.join(FAMILIES)}")
    return Arm(name, family, parse_settings(settings))


def add_grid(arms: list[Arm], text: str) -> None:
    """``[NAME:]key=v1,v2,...``: the values to try, for the named arm or for every arm."""
    head, _, _ = text.partition("=")
    name, _, body = text.partition(":") if ":" in head else ("", "", text)
    chosen = [a for a in arms if a.name == name] if name else arms
    if not chosen:
        raise ValueError(f"--grid {text!r} names no arm; arms: {', '.join(a.name for a in arms)}")
    for key, values in parse_settings(body).items():
        for arm in chosen:
            arm.grid[key] = values.split(",")


def label(point: dict[str, str]) -> str:
    """A point by all its settings, as typed: the same run from another invocation gets the same label."""
    return ",".join(f"{k.removeprefix('optim.')}={v}" for k, v in sorted(point.items())) or "default"


def arm_config(base: dict[str, str], arm: Arm, point: dict[str, str], seed: int) -> tuple[TrainConfig, int]:
    """The run's TrainConfig at one of the arm's points (steps still the default for adamw arms), and its epochs."""
    settings = dict(point)
    epochs = int(settings.pop("epochs", EPOCHS if arm.family == "adamw" else 0))
    if arm.family == "zo" and epochs:
        raise ValueError(f"arm {arm.name}: epochs is for adamw arms; zo arms count steps")
    if arm.family == "adamw":
        refused = sorted(ZO_ONLY & set(settings)) + (["steps"] if "steps" in settings else [])
        if refused:
            raise ValueError(f"arm {arm.name}: {', '.join(refused)} do not apply to adamw (steps come from epochs)")
        settings = {**FIRST_ORDER_DEFAULTS, **settings}
    if any(k.startswith("model.") for k in settings):
        raise ValueError(f"arm {arm.name}: the model is loaded once for all arms; set it with --model or --set")
    return load_config(overrides={**base, **settings, "seed": seed, "task.seed": seed}), epochs


def sized(cfg: TrainConfig, epochs: int, train_examples: int) -> TrainConfig:
    """Steps from epochs (adamw) and a default evaluation interval."""
    if epochs:
        cfg = replace(cfg, steps=max(1, math.ceil(epochs * train_examples / cfg.batch_size)))
    if not cfg.eval_every:
        cfg = replace(cfg, eval_every=max(1, cfg.steps // EVALUATIONS))
    return cfg


# ---------------------------------------------------------------- one run

# A training step: (loss, forward passes, backward passes) of the batch, and the algorithm's own
# numbers of the step (the adaptive eps factor, FZOO's sigma: what its trajectory line holds that is a number).
Step = Callable[[int], tuple[float, int, int, dict[str, float]]]


def clock(device: torch.device) -> float:
    """Seconds, once the device has finished what was queued (kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def zo_steps(model, tokenizer, cfg: TrainConfig, data: TaskData) -> tuple[Step, Callable[[], None]]:
    """ZO-SGD as the Trainer builds it (trainer.Trainer.__init__ and _loop), on one process."""
    opt = build_optimizer(cfg, model)
    stream = BatchStream(data.train, cfg.batch_size, cfg.seed, cfg.group_by_length)
    kind = get_task(cfg.task.name).kind

    def step(t: int) -> tuple[float, int, int, dict[str, float]]:
        stats = opt.step(collate_train(stream.at(t), tokenizer, kind, cfg.task.max_length,
                                       pad_to_multiple_of=cfg.task.pad_to_multiple_of))
        numbers = {k: v for k, v in stats.log.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return stats.loss, sum(len(probes) for probes in stats.losses), 0, numbers

    return step, opt.flush


def adamw_steps(model, tokenizer, cfg: TrainConfig, data: TaskData) -> tuple[Step, Callable[[], None]]:
    """AdamW by backprop on the batches and the loss the ZO arms use; lr follows optim.schedule.

    Weight decay (optim.weight_decay, 0 by default as in MeZO's baselines) applies to every
    trainable tensor, unlike ZO-SGD's, which spares biases and norm weights.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cfg.optim.schedule_for(cfg.steps).factor)
    stream = BatchStream(data.train, cfg.batch_size, cfg.seed, cfg.group_by_length)
    kind = get_task(cfg.task.name).kind
    device = params[0].device
    model.train()

    def step(t: int) -> tuple[float, int, int, dict[str, float]]:
        batch = collate_train(stream.at(t), tokenizer, kind, cfg.task.max_length,
                              pad_to_multiple_of=cfg.task.pad_to_multiple_of)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k in MODEL_INPUTS}
        loss = default_loss(model(**inputs).logits, batch)
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), 1, 1, {}

    return step, lambda: None


STEPS_OF = {"zo": zo_steps, "adamw": adamw_steps}


@dataclass
class RunResult:
    record: dict[str, Any]
    rows: list[dict[str, Any]]
    losses: list[float]


class Run:
    """One run's loop: train, evaluate on dev every eval_every steps, on test at each new best dev."""

    def __init__(self, bench: Bench, model, cfg: TrainConfig, identity: dict[str, Any]):
        self.bench, self.model, self.cfg, self.identity = bench, model, cfg, identity
        self.task = get_task(cfg.task.name)
        self.data = bench.data(cfg.task)
        self.metric, self.higher = SELECT_BY[self.task.kind]
        self.rows: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.window: list[float] = []
        self.best: dict[str, Any] | None = None
        self.passes = {"forwards": 0, "backwards": 0}
        self.numbers: dict[str, float] = {}  # the algorithm's numbers after the last step
        self.train_seconds = 0.0

    def train(self, step: Step, flush: Callable[[], None]) -> RunResult:
        device, cfg = self.bench.device, self.cfg
        self.began = clock(device)
        self.evaluate(0, flush)
        stopped, non_finite = None, 0
        for t in range(cfg.steps):
            if time.monotonic() > self.bench.deadline:
                stopped = "time budget"
                break
            started = clock(device)
            loss, forwards, backwards, self.numbers = step(t)
            self.train_seconds += clock(device) - started
            self.passes["forwards"] += forwards
            self.passes["backwards"] += backwards
            self.losses.append(loss)
            non_finite = 0 if math.isfinite(loss) else non_finite + 1
            if non_finite > cfg.max_skipped_steps:
                stopped = "diverged"
                break
            if math.isfinite(loss):
                self.window.append(loss)
            if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
                self.evaluate(t + 1, flush)
        if stopped == "time budget" and self.rows[-1]["step"] < len(self.losses):
            self.evaluate(len(self.losses), flush)  # the curve ends where training stopped
        return RunResult(self.record(stopped), self.rows, self.losses)

    def evaluate(self, step: int, flush: Callable[[], None]) -> None:
        flush()
        cfg, tokenizer = self.cfg, self.bench.tokenizer
        dev = evaluate(self.model, tokenizer, self.task, self.data.dev, cfg.eval_batch_size, cfg.task.max_length)
        improved = self.best is None or better(dev[self.metric], self.best["dev"][self.metric], self.higher)
        test = None
        if improved:
            test = evaluate(self.model, tokenizer, self.task, self.data.test, cfg.eval_batch_size, cfg.task.max_length)
        row = {**self.identity, "step": step, **self.passes, "train_seconds": round(self.train_seconds, 4),
               "wall_seconds": round(clock(self.bench.device) - self.began, 4),
               "train_loss": statistics.fmean(self.window) if self.window else None, "dev": dev, "test": test,
               **({"algorithm": self.numbers} if self.numbers else {})}
        self.window = []
        if improved:
            self.best = row
        self.rows.append(row)
        self.bench.write("evals.jsonl", row)
        print(f"{self.identity['run']} step {step}: dev {self.metric} {dev[self.metric]:.4f}"
              f"{' (best)' if improved else ''}, {self.passes['forwards']} fwd, {self.train_seconds:.1f} s", flush=True)

    def record(self, stopped: str | None) -> dict[str, Any]:
        best = self.best or {}
        return {**self.identity, "metric": self.metric, "higher": self.higher, "steps": self.cfg.steps,
                "steps_done": len(self.losses), "stopped": stopped, "best_step": best.get("step"),
                "best_dev": best.get("dev"), "test_at_best_dev": best.get("test"),
                "zero_shot_test": self.rows[0]["test"],
                **self.passes, "train_seconds": round(self.train_seconds, 4),
                "wall_seconds": self.rows[-1]["wall_seconds"], "config": asdict(self.cfg)}


def better(value: float, best: float, higher: bool) -> bool:
    return value > best if higher else value < best


# ---------------------------------------------------------------- the bench: one model, many runs


class Bench:
    def __init__(self, base: dict[str, str], out: Path | None = None, time_budget_s: float = 0.0):
        # The budget counts from here: loading (a first GGUF conversion) spends it too.
        self.deadline = time.monotonic() + time_budget_s if time_budget_s else math.inf
        self.base = base
        self.model, self.tokenizer = load_model(load_config(overrides=base).model)
        self.device = next(self.model.parameters()).device
        self.out = out
        self._data: dict[str, TaskData] = {}
        self._seconds: dict[str, float] = {}  # the wall time of each arm's last complete run
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def data(self, task_cfg) -> TaskData:
        key = json.dumps(asdict(task_cfg), sort_keys=True)
        if key not in self._data:
            self._data[key] = load_task(task_cfg)
        return self._data[key]

    def fresh(self, cfg: TrainConfig):
        """A copy of the base weights, with LoRA adapters initialised as the Trainer does."""
        model = copy.deepcopy(self.model)
        if cfg.use_lora:
            torch.manual_seed(cfg.seed)
            model = apply_lora(model, cfg.lora)
        return model

    def write(self, name: str, row: dict[str, Any]) -> None:
        if self.out is not None:
            with open(self.out / name, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=str) + "\n")  # NaN stays NaN: a diverged run shows as one

    def run(self, arm: Arm, point: dict[str, str], seed: int) -> RunResult | None:
        """One run of ``arm`` at a grid point and seed; None when the time budget has no room for it."""
        cfg, epochs = arm_config(self.base, arm, point, seed)
        cfg = sized(cfg, epochs, len(self.data(cfg.task).train))
        left = self.deadline - time.monotonic()
        identity = {"run": f"{arm.name} {label(point)} seed {seed}", "arm": arm.name, "family": arm.family,
                    "point": label(point), "seed": seed}
        needs = self._seconds.get(arm.name, 0.0)  # nothing known before an arm's first complete run
        if left < needs:
            print(f"skipped {identity['run']}: {max(left, 0):.0f} s of the budget left, "
                  f"the arm's last run took {needs:.0f} s")
            return None
        model = self.fresh(cfg)
        step, flush = STEPS_OF[arm.family](model, self.tokenizer, cfg, self.data(cfg.task))
        result = Run(self, model, cfg, identity).train(step, flush)
        self.write("runs.jsonl", result.record)
        if result.record["stopped"] is None:
            self._seconds[arm.name] = result.record["wall_seconds"]
        del model, step, flush
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return result

    def run_all(self, arms: list[Arm], seeds: list[int]) -> list[dict[str, Any]]:
        """Every arm's grid with the first seed, then each arm's chosen point with the other seeds."""
        records: list[dict[str, Any]] = []

        def attempt(arm: Arm, point: dict[str, str], seed: int) -> None:
            result = self.run(arm, point, seed)
            if result is not None:
                records.append(result.record)

        for arm in arms:
            for point in arm.points():
                attempt(arm, point, seeds[0])
        for arm in arms:
            chosen = select_point([r for r in records if r["arm"] == arm.name])
            for point in (p for p in arm.points() if label(p) == chosen):
                for seed in seeds[1:]:
                    attempt(arm, point, seed)
        return records


# ---------------------------------------------------------------- summary


def complete(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["stopped"] is None]


def select_point(records: list[dict[str, Any]]) -> str | None:
    """The grid point with the best mean best-dev over the seeds that every point has run."""
    runs = complete(records)
    if not runs:
        return None
    points = sorted({r["point"] for r in runs})
    common = set.intersection(*({r["seed"] for r in runs if r["point"] == p} for p in points))
    metric, higher = runs[0]["metric"], runs[0]["higher"]

    def score(point: str) -> float:
        values = [r["best_dev"][metric] for r in runs if r["point"] == point and r["seed"] in common]
        return statistics.fmean(values) * (1 if higher else -1)

    return max(points, key=score) if common else None


def first_reaching(rows: list[dict[str, Any]], metric: str, target: float, higher: bool) -> dict[str, Any] | None:
    """The first evaluation (in step order) whose dev score reaches ``target``."""
    for row in sorted(rows, key=lambda r: r["step"]):
        value = row["dev"][metric]
        if (value >= target) if higher else (value <= target):
            return row
    return None


def spread(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    if not values:
        return {"n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def passes(row: dict[str, Any]) -> int:
    return row["forwards"] + BACKWARD_IN_FORWARDS * row["backwards"]


def summarize(rows: list[dict[str, Any]], records: list[dict[str, Any]], target_arm: str | None = None,
              target: float | None = None) -> dict[str, Any]:
    arms = {}
    for name in dict.fromkeys(r["arm"] for r in records):
        runs = [r for r in records if r["arm"] == name]
        chosen = select_point(runs)
        final = [r for r in complete(runs) if r["point"] == chosen]
        metric = runs[0]["metric"]
        arms[name] = {
            "family": runs[0]["family"], "metric": metric, "chosen": chosen,
            "grid": {p: spread([r["best_dev"][metric] for r in complete(runs) if r["point"] == p])
                     for p in dict.fromkeys(r["point"] for r in runs)},
            "seeds": [r["seed"] for r in final],
            "best_dev": spread([r["best_dev"][metric] for r in final]),
            "test_at_best_dev": spread([r["test_at_best_dev"][metric] for r in final]),
            "zero_shot_test": spread([r["zero_shot_test"][metric] for r in final]),
            "incomplete": [r["run"] for r in runs if r["stopped"] is not None],
        }
    if target is None and target_arm is not None:
        if target_arm in arms and arms[target_arm]["best_dev"]["n"]:
            target = arms[target_arm]["best_dev"]["mean"]
        else:  # the runs are written already: summarise them without a target rather than fail
            print(f"--target-arm {target_arm}: no complete run of that arm, so no target")
    if target is not None:
        for name, arm in arms.items():
            arm["to_target"] = to_target(rows, records, name, arm["chosen"], target)
    return {"target": {"value": target, "from": target_arm}, "arms": arms}


def to_target(rows, records, arm: str, point: str | None, target: float) -> dict[str, Any]:
    """Per seed of the chosen point: passes, forwards and seconds until dev first reaches the target."""
    final = [r for r in complete(records) if r["arm"] == arm and r["point"] == point]
    reached = []
    for record in final:
        history = [row for row in rows if row["run"] == record["run"]]
        hit = first_reaching(history, record["metric"], target, record["higher"])
        if hit is not None:
            reached.append(hit)
    return {"reached": len(reached), "of": len(final), "passes": spread([passes(h) for h in reached]),
            "forwards": spread([h["forwards"] for h in reached]),
            "train_seconds": spread([h["train_seconds"] for h in reached]),
            "step": spread([h["step"] for h in reached])}


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    """Dev score against passes and against training seconds, the chosen point of every arm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (the JSON files hold every point)")
        return
    target = summary["target"]["value"]
    palette = plt.get_cmap("tab10" if len(summary["arms"]) <= 10 else "tab20")  # one colour per arm, none twice
    for name, x_of, x_label in (("dev_vs_passes.png", passes, "forward passes (a backward counted as 2)"),
                                ("dev_vs_seconds.png", lambda r: r["train_seconds"], "training seconds")):
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for colour, (arm, info) in enumerate(summary["arms"].items()):
            runs = {r["run"] for r in rows if r["arm"] == arm and r["point"] == info["chosen"]}
            for i, run in enumerate(sorted(runs)):
                history = sorted((r for r in rows if r["run"] == run), key=lambda r: r["step"])
                ax.plot([x_of(r) for r in history], [r["dev"][info["metric"]] for r in history], color=palette(colour % palette.N),
                        alpha=0.8, linewidth=1.2, label=_legend(arm, info["chosen"], len(runs)) if i == 0 else None)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="target")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)  # no negative side: every x counts something
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"dev {next(iter(summary['arms'].values()))['metric']}" if summary["arms"] else "dev")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


# settings every arm of a benchmark shares, or that the arm's name already says: left out of a legend
_UNSAID = ("eval_every", "cuda_graphs", "steps")


def _legend(arm: str, point: str, seeds: int) -> str:
    """An arm's line in a legend: its name, the settings that tell its point apart, its seed count."""
    said = [kv for kv in NEXT_SETTING.split(point) if kv.split("=")[0] not in _UNSAID and "=" in kv]
    return f"{arm}: {', '.join(said)} ({seeds} seed{'s' * (seeds != 1)})"


def write_summary(rows, records, out: Path, target_arm: str | None, target: float | None) -> dict[str, Any]:
    summary = summarize(rows, records, target_arm, target)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot(rows, summary, out)
    return summary


def read_results(folders: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(evaluation rows, run records) of several output folders; a run found twice keeps its last copy."""
    rows: dict[str, list[dict[str, Any]]] = {}
    records: dict[str, dict[str, Any]] = {}
    for folder in folders:
        if not (folder / "runs.jsonl").is_file():
            raise FileNotFoundError(f"{folder} is not an output folder of bench/convergence.py run (no runs.jsonl)")
        evaluations = read_jsonl(folder / "evals.jsonl")
        for record in read_jsonl(folder / "runs.jsonl"):
            records[record["run"]] = record
            rows[record["run"]] = [r for r in evaluations if r["run"] == record["run"]]
    return [r for run in records for r in rows[run]], list(records.values())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the arms, then summarise")
    run.add_argument("--model", default="default", help="as distzo train's --model")
    run.add_argument("--task", default="debates", help="as distzo train's --task")
    run.add_argument("--set", action="append", default=[], help="key=value,... for every arm (repeatable)")
    run.add_argument("--arm", action="append", required=True, help="NAME:FAMILY[:key=value,...] (repeatable)")
    run.add_argument("--grid", action="append", default=[], help="[NAME:]key=v1,v2,... (repeatable)")
    run.add_argument("--seeds", default="0", help="comma-separated; the grid runs with the first")
    run.add_argument("--time-budget-s", type=float, default=0.0, help="stop and skip runs past this (0 = none)")
    run.add_argument("--out", type=Path, required=True)
    merge = sub.add_parser("summarize", help="summarise the output folders of one or more runs")
    merge.add_argument("folders", nargs="+", type=Path)
    merge.add_argument("--out", type=Path, required=True)
    for command in (run, merge):
        group = command.add_mutually_exclusive_group()
        group.add_argument("--target-arm", help="the arm whose mean best dev is the target")
        group.add_argument("--target", type=float, help="the target dev score")
    return p


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars would bury the evaluation lines
    args = parser().parse_args(argv)
    try:  # what was typed is checked before anything runs or is written: a bad value is one line
        if args.command == "summarize":
            rows, records = read_results(args.folders)
        else:
            base = {"model.name": args.model, "task.name": args.task}
            for text in args.set:
                base.update(parse_settings(text))
            arms = [parse_arm(text) for text in args.arm]
            for text in args.grid:
                add_grid(arms, text)
            seeds = parse_seeds(args.seeds)
            for arm in arms:  # each point's configuration builds (unknown keys, bad values)
                for point in arm.points():
                    arm_config(base, arm, point, seeds[0])
    except (ValueError, FileNotFoundError) as exc:
        print(f"convergence: error: {exc}", file=sys.stderr)
        return 2
    if args.command != "summarize":
        bench = Bench(base, args.out, args.time_budget_s)
        bench.run_all(arms, seeds)
        rows, records = read_results([args.out])
    summary = write_summary(rows, records, args.out, args.target_arm, args.target)
    print(json.dumps({name: {k: arm[k] for k in ("chosen", "best_dev", "test_at_best_dev")}
                      for name, arm in summary["arms"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
