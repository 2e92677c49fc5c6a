"""The ``distzo`` command: train | eval | replay.

    distzo train                                   # the offline default job
    distzo train --config run.yaml --lr 1e-6       # a YAML file, flags override it
    distzo train --model facebook/opt-1.3b --task sst2 --dtype bf16
    distzo eval --model runs/distzo/checkpoints/best --task rotten_tomatoes
    distzo replay BASE runs/distzo/trajectory.jsonl --output rebuilt/
    torchrun --nproc-per-node 2 -m distzo.cli train --parallel.pert 2 ...

Bad input (unknown model or task, missing file, bad value) ends with one line on
stderr and exit code 2; nothing already written is overwritten. Under torchrun, a rank
that loses its peers (one died or hung past parallel.timeout_s) ends with one line and
exit code 4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from distzo import __version__

# Short flags for the options people change most.
ALIASES = {
    "model": "model.name",
    "dtype": "model.dtype",
    "device": "model.device",
    "task": "task.name",
    "data": "task.data_path",
    "lr": "optim.lr",
    "eps": "optim.eps",
    "directions": "optim.directions",
    "lora": "use_lora",
    "offload": "offload.mode",
    "gpu-memory": "offload.gpu_memory",
}
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError)


def _train_parser(sub) -> None:
    from distzo.config import flat_fields

    p = sub.add_parser("train", help="fine-tune a model with zeroth-order SGD",
                       description="Fine-tune a model with zeroth-order SGD. With no arguments: the packaged "
                       "SmolLM2-135M-Instruct on rotten_tomatoes, offline.")
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    group = p.add_argument_group("settings (also valid as YAML keys; dots nest)")
    for name, tp, default, doc in flat_fields():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        flags += [f"--{a}" for a, target in ALIASES.items() if target == name]
        is_bool = tp is bool
        group.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar=None if is_bool else "V",
                           nargs="?" if is_bool else None, const="true" if is_bool else None,
                           help=f"{doc} (default: {default})".strip())


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model or checkpoint on a task's split")
    p.add_argument("--model", default="default", help="hub id, local folder (a checkpoint), or .gguf file")
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--data", default=None, help="local data file or folder for the task")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--num-examples", type=int, default=500)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)


def _replay_parser(sub) -> None:
    p = sub.add_parser("replay", help="rebuild fine-tuned weights from a base model and a trajectory log")
    p.add_argument("base", help="the base model the run started from (hub id, folder or .gguf)")
    p.add_argument("log", help="the run's trajectory.jsonl")
    p.add_argument("--output", required=True, help="folder to write the rebuilt checkpoint to (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output (never a run's checkpoints, its log or the base model)")
    p.add_argument("--upto", type=int, default=None, help="replay steps 0..UPTO (default: all logged steps)")
    p.add_argument("--device", default="auto")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distzo", description="Zeroth-order fine-tuning of Hugging Face LMs.")
    p.add_argument("--version", action="version", version=f"distzo {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,replay}")
    _train_parser(sub)
    _eval_parser(sub)
    _replay_parser(sub)
    return p


def run_train(args: argparse.Namespace) -> int:
    from distzo.config import load_config
    from distzo.trainer import train

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    cfg = load_config(args.config, overrides)
    results = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # one summary per job, not one per rank
        print(_summary(results, cfg.output_dir))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from distzo.evaluate import evaluate
    from distzo.models import ModelConfig, load_model
    from distzo.tasks import TaskConfig, get_task, load_task

    n = args.num_examples
    sizes = {"train": (n, 0, 0), "dev": (0, n, 0), "test": (0, 0, n)}[args.split]
    tcfg = TaskConfig(name=args.task, data_path=args.data, num_train=sizes[0], num_dev=sizes[1], num_test=sizes[2],
                      max_length=args.max_length)
    model, tokenizer = load_model(ModelConfig(name=args.model, dtype=args.dtype, device=args.device))
    examples = getattr(load_task(tcfg), args.split)
    metrics = evaluate(model, tokenizer, get_task(args.task), examples, args.batch_size, args.max_length)
    print(json.dumps({"model": args.model, "task": args.task, "split": args.split, "examples": len(examples),
                      **metrics}))
    return 0


def run_replay(args: argparse.Namespace) -> int:
    import warnings

    from distzo.replay import ReplayWarning, replay

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReplayWarning)
            done = replay(args.base, args.log, args.output, args.upto, args.device, args.overwrite)
    finally:  # shown once recording has stopped, also when replay refused to go on
        for w in caught:
            if issubclass(w.category, ReplayWarning):
                print(f"distzo: warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"replayed steps 0..{done.steps - 1} ({done.steps} steps); rebuilt weights written to {done.output}")
    return 0


def _summary(results: dict[str, Any], output_dir: str) -> str:
    lines = [f"task {results['task']}, model {results['model']}, {results['steps']} steps"]
    n = results["test_examples"]
    for label, key in (("zero-shot", "zero_shot"), ("fine-tuned", "final")):
        for metric, value in (results.get(key) or {}).items():
            lines.append(f"{label:>10} {metric} on {n} held-out examples: {value:.4f}")
    minutes, seconds = divmod(int(results["wall_seconds"]), 60)
    lines.append(f"wall time {minutes}m {seconds:02d}s; outputs in {output_dir}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from distzo.parallel import ParallelError
    from distzo.trainer import Interrupted, TrainingDiverged
    from distzo.units import UnsupportedModel

    _quiet_hub_progress_bars()
    p = parser()
    args = p.parse_args(["train"] if argv == [] or (argv is None and len(sys.argv) == 1) else argv)
    handlers = {"train": run_train, "eval": run_eval, "replay": run_replay}
    try:
        return handlers[args.command](args)
    except USAGE_ERRORS + (UnsupportedModel,) as exc:
        print(f"distzo: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"distzo: error: {_one_line(exc)}", file=sys.stderr)
        return 3
    except ParallelError as exc:
        print(f"distzo: error: {_one_line(exc)}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # The process group lost a peer: its threads can abort the interpreter's teardown
        # (SIGABRT) and replace this exit code. The run's files are already durable.
        os._exit(4)
    except Interrupted as exc:
        print(f"distzo: {exc}", file=sys.stderr)
        return 128 + exc.signum


def _quiet_hub_progress_bars() -> None:
    """Per-shard load/save bars of transformers drown the training bar and error lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
