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
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

from distzo import __version__

if TYPE_CHECKING:
    from distzo.config import TrainConfig

# Short flags for the options people change most.
ALIASES = {
    "model": "model.name",
    "dtype": "model.dtype",
    "quantize": "model.quantize",
    "double-quant": "model.double_quant",
    "base-compute": "model.base_compute",
    "device": "model.device",
    "task": "task.name",
    "data": "task.data_path",
    "dataset": "task.dataset",
    "dataset-config": "task.dataset_config",
    "train-split": "task.train_split",
    "dev-split": "task.dev_split",
    "test-split": "task.test_split",
    "template": "task.template",
    "text-column": "task.text_column",
    "label-column": "task.label_column",
    "labels": "task.labels",
    "label-values": "task.label_values",
    "prompt-column": "task.prompt_column",
    "completion-column": "task.completion_column",
    "messages-column": "task.messages_column",
    "lr": "optim.lr",
    "eps": "optim.eps",
    "directions": "optim.directions",
    "lora": "use_lora",
    "offload": "offload.mode",
    "gpu-memory": "offload.gpu_memory",
    "cuda-graphs": "optim.cuda_graphs",
    "batch-streams": "optim.batch_streams",
    "tensorboard": "report_to",  # the boolean flag report_to replaced: true|false still work
}
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError)


class _Parser(argparse.ArgumentParser):
    """argparse held to distzo's contract for bad input: one line on stderr, exit code 2.

    Subparsers are of this class too (argparse makes them of the parent's class).
    """

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(_attach_negative_values(args), namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"distzo: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _attach_negative_values(args: list[str]) -> list[str]:
    """``--lr -1e-5`` as ``--lr=-1e-5``: argparse takes "-1e-5" or "-inf" (unlike "-1") for an
    option, so the value would never reach the validation that says what is wrong with it."""
    out: list[str] = []
    for arg in args:
        flag = out[-1] if out else ""
        if flag.startswith("--") and flag != "--" and "=" not in flag and _is_negative_number(arg):
            out[-1] = f"{flag}={arg}"
        else:
            out.append(arg)
    return out


def _is_negative_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return arg.startswith("-")


def _train_parser(sub) -> None:
    from distzo.config import flat_fields

    p = sub.add_parser("train", help="fine-tune a model with zeroth-order SGD",
                       description="Fine-tune a model with zeroth-order SGD. With no arguments: the packaged "
                       "SmolLM2-135M-Instruct on rotten_tomatoes, offline.")
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    _add_settings(p.add_argument_group("settings (also valid as YAML keys; dots nest)"), flat_fields(), ALIASES)


def _add_settings(group, fields, aliases: dict[str, str]) -> None:
    """One flag per config field (dotted name, its dashed form, its short aliases), help from its docstring."""
    for name, tp, default, doc in fields:
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        flags += [f"--{a}" for a, target in aliases.items() if target == name]
        is_bool = tp is bool
        help_text = f"{doc} (default: {_shown(default)})".strip()
        group.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar="BOOL" if is_bool else "V",
                           nargs="?" if is_bool else None, const="true" if is_bool else None,
                           help=help_text.replace("%", "%%"))  # argparse %-formats help text


def _shown(value: Any) -> str:
    """A default as one would type it on the command line: lists comma-separated, '' quoted."""
    return shlex.quote(",".join(map(str, value)) if isinstance(value, list) else str(value))


# eval's own flags beside the task's settings; the split's size comes from --num-examples.
EVAL_ALIASES = {**{a: t for a, t in ALIASES.items() if t.startswith("task.")}, "max-length": "task.max_length"}
SPLIT_SIZES = ("task.num_train", "task.num_dev", "task.num_test")


def _eval_parser(sub) -> None:
    from distzo.config import flat_fields
    from distzo.tasks import TASKS, TaskConfig

    p = sub.add_parser("eval", help="evaluate a model or checkpoint on a task's split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description=f"Score a model on a task's split. Tasks: {', '.join(TASKS)}.")
    p.add_argument("--model", default="default", help="hub id, local folder (a checkpoint), or .gguf file")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"], help="the split to score")
    p.add_argument("--num-examples", type=int, default=500, help="examples drawn from the split")
    p.add_argument("--dtype", default=None,
                   help="weight dtype: float32 | bfloat16 | float16 (default float32; for the checkpoint of a run "
                        "on a quantized base, the compute dtype it trained with)")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu; or a torch device")
    p.add_argument("--batch-size", type=_batch_size, default=32,
                   help="examples per forward, or auto (as many as fit in half the free GPU memory)")
    fields = [f for f in flat_fields(TaskConfig(), "task.") if f[0] not in SPLIT_SIZES]
    _add_settings(p.add_argument_group("task settings (as in train)"), fields, EVAL_ALIASES)


def _batch_size(text: str) -> int | str:
    from distzo.evaluate import AUTO, check_batch_size

    try:
        return check_batch_size(text if text == AUTO else int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or {AUTO}, got {text!r}") from None


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
    p = _Parser(prog="distzo", description="Zeroth-order fine-tuning of Hugging Face LMs.")
    p.add_argument("--version", action="version", version=f"distzo {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,replay}")
    _train_parser(sub)
    _eval_parser(sub)
    _replay_parser(sub)
    return p


def train_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < the --config file < the flags given (argparse leaves the others out of ``args``)."""
    from distzo.config import load_config

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return load_config(args.config, overrides)


def run_train(args: argparse.Namespace) -> int:
    from distzo.trainer import train

    cfg = train_config(args)
    results = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # one summary per job, not one per rank
        print(_summary(results, cfg.output_dir))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from distzo import parallel
    from distzo.config import build, dotted_to_nested
    from distzo.evaluate import evaluate
    from distzo.models import ModelConfig, is_quantized_checkpoint, load_model, load_quantized_checkpoint
    from distzo.tasks import TaskConfig, get_task, load_task

    n = args.num_examples
    sizes = {"train": (n, 0, 0), "dev": (0, n, 0), "test": (0, 0, n)}[args.split]
    settings = {k: v for k, v in vars(args).items() if k.startswith("task.")}
    settings.update(zip(SPLIT_SIZES, sizes))
    tcfg = build(TaskConfig(), dotted_to_nested(settings)["task"], "task.")
    mesh = parallel.init(device=args.device)  # under torchrun every rank scores its share
    try:
        if is_quantized_checkpoint(args.model):  # its base rebuilt as recorded, the adapter over it
            model, tokenizer = load_quantized_checkpoint(args.model, args.device, args.dtype)
        else:
            model, tokenizer = load_model(ModelConfig(name=args.model, dtype=args.dtype or "float32",
                                                      device=args.device))
        examples = getattr(load_task(tcfg), args.split)
        began = time.perf_counter()
        metrics = evaluate(model, tokenizer, get_task(tcfg.name), examples, args.batch_size, tcfg.max_length,
                           mesh=mesh)
        seconds = round(time.perf_counter() - began, 3)
    finally:
        mesh.close()
    if mesh.is_main:
        print(json.dumps({"model": args.model, "task": tcfg.name, "split": args.split, "examples": len(examples),
                          **metrics, "eval_seconds": seconds}))
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
    best = results.get("best_dev") or {}
    rows = [("zero-shot", "zero_shot"), ("fine-tuned", "final"), (f"best dev (step {best.get('step')})", "test_at_best_dev")]
    for label, key in rows:
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
    try:
        args = p.parse_args(["train"] if argv == [] or (argv is None and len(sys.argv) == 1) else argv)
    except SystemExit as exc:  # --help, --version, or a usage error already reported in one line
        return int(exc.code or 0)
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
    except KeyboardInterrupt:
        print("distzo: stopped at once by a second signal; the last complete checkpoint and the trajectory log "
              "are intact, and --resume continues the run", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only folder, a path below a file, a corrupt file
        print(f"distzo: error: {_os_error(exc)}", file=sys.stderr)
        return 2


def _quiet_hub_progress_bars() -> None:
    """Per-shard load/save bars of transformers drown the training bar and error lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _os_error(exc: OSError) -> str:
    if exc.strerror and exc.filename:
        return f"{exc.strerror}: '{exc.filename}'"
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
