"""Command-line behaviour: help, config files, and one-line errors with exit code 2 on bad input."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distzo import __version__
from distzo.cli import main, parser, train_config
from distzo.config import TrainConfig, coerce, flat_fields, load_config, to_dict
from distzo.tasks import TASKS

CONFIGS = sorted((Path(__file__).parents[1] / "src" / "distzo" / "configs").glob("*.yaml"))


def _fail(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distzo: error: ") and "\n" not in err, err
    return err


def test_help_lists_settings(capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--optim.lr", "--lr", "--model", "--task", "--output-dir", "--resume", "--lora"):
        assert flag in text


def _help(capsys, command: str) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def _help_entries(text: str) -> dict[str, str]:
    """Each option's help text, whitespace collapsed, by its first flag."""
    entries = re.split(r"\n(?=  -)", text.split("\n\n", 1)[1])  # after the usage
    out = {}
    for entry in (e.strip() for e in entries if e.startswith("  -")):
        flags, help_text = re.split(r"\s{2,}", entry, maxsplit=1)  # argparse's column gap
        out[flags.split()[0].rstrip(",")] = " ".join(help_text.split())
    return out


def test_help_shows_the_defaults_that_run(capsys):
    entries = _help_entries(_help(capsys, "train"))
    for name, tp, value, _ in flat_fields():
        doc, shown = re.fullmatch(r"(.*)\(default: (.*)\)", entries[f"--{name}"]).groups()
        assert doc.strip() and "``" not in doc, name
        assert coerce(shlex.split(shown)[0], tp, name) == value, name  # typed back, the shown default is the value
    assert "(default: 3e-05)" in entries["--optim.lr"] and "(default: 500)" in entries["--task.num_test"]


def test_eval_help_shows_defaults_and_the_tasks(capsys):
    entries = _help_entries(_help(capsys, "eval"))
    assert "(default: 500)" in entries["--num-examples"] and "(default: rotten_tomatoes)" in entries["--task.name"]
    assert all("(default: " in e for flag, e in entries.items() if flag != "-h")
    assert f"Tasks: {', '.join(TASKS)}." in " ".join(_help(capsys, "eval").split())


def test_python_dash_m_distzo_is_the_distzo_command():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    run = lambda *argv: subprocess.run([sys.executable, "-m", "distzo", *argv], env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    version = run("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"distzo {__version__}")
    train_help = run("train", "--help")
    assert train_help.returncode == 0 and "--report-to" in train_help.stdout and "--push-to-hub" in train_help.stdout


@pytest.mark.parametrize("argv,report_to", [
    ([], ["tensorboard"]),
    (["--report-to", "wandb,mlflow"], ["wandb", "mlflow"]),
    (["--report-to", "none"], ["none"]),
    (["--tensorboard", "false"], ["none"]),  # the flag report_to replaced keeps its meaning
    (["--tensorboard", "true"], ["tensorboard"]),
])
def test_report_to_and_the_old_tensorboard_flag(argv, report_to):
    assert train_config(parser().parse_args(["train", *argv])).report_to == report_to


def _typed(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


@pytest.mark.parametrize("name,value", [(n, v) for n, _, v, _ in flat_fields()], ids=lambda x: str(x))
def test_one_flag_keeps_every_other_default(name, value):
    cfg = train_config(parser().parse_args(["train", f"--{name}", _typed(value)]))
    assert to_dict(cfg) == to_dict(TrainConfig())


@pytest.mark.parametrize("argv,changed", [
    (["--eps", "1e-2"], {"optim": {"eps": 0.01}}),
    (["--optim.schedule", "cosine"], {"optim": {"schedule": "cosine"}}),
    (["--task.max_length", "128"], {"task": {"max_length": 128}}),
    (["--lora.r", "4", "--lr", "1e-4"], {"lora": {"r": 4}, "optim": {"lr": 1e-4}}),
])
def test_section_flags_change_only_their_field(argv, changed):
    expected = to_dict(TrainConfig())
    for section, values in changed.items():
        expected[section].update(values)
    assert to_dict(train_config(parser().parse_args(["train", *argv]))) == expected


def test_yaml_section_then_flag_in_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  eps: 0.01\n")
    cfg = train_config(parser().parse_args(["train", "--config", str(path), "--optim.schedule", "cosine"]))
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.schedule) == (TrainConfig().optim.lr, 0.01, "cosine")


def test_defaults_are_the_default_job():
    cfg = TrainConfig()
    assert cfg.model.name == "default" and cfg.task.name == "rotten_tomatoes" and cfg.task.num_test == 500


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert set(yaml.safe_load(path.read_text())) <= set(TrainConfig.__dataclass_fields__)


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-5\n  eps: 0.01\nsteps: 7\ntask:\n  name: sst2\n")
    cfg = load_config(path, {"optim.lr": "2e-5", "use_lora": "true"})
    assert cfg.optim.lr == 2e-5 and cfg.optim.eps == 0.01 and cfg.steps == 7 and cfg.task.name == "sst2"
    assert cfg.use_lora is True


@pytest.mark.parametrize("argv,message", [
    (["train", "--task", "nosuchtask"], "unknown task"),
    (["train", "--lr", "abc"], "expects float"),
    (["train", "--steps", "0"], "steps must be >= 1"),
    (["train", "--dtype", "fp8"], "unknown dtype"),
    (["train", "--optim.perturbation", "laplace"], "perturbation kind"),
    (["train", "--config", "/nonexistent/run.yaml"], "does not exist"),
    (["train", "--model", "./no/such/model"], "does not exist"),
    (["eval", "--task", "nosuchtask"], "unknown task"),
    (["train", "--offload", "disk"], "offload.mode must be one of"),
    (["train", "--offload", "cpu", "--gpu-memory", "lots"], "is not a memory size"),
    (["train", "--lr", "-1e-5"], "optim.lr must be >= 0"),
    (["train", "--eps", "-inf"], "config key 'optim.eps' must be a finite number"),
    (["train", "--eps", "inf"], "config key 'optim.eps' must be a finite number"),
    (["train", "--lr", "nan"], "config key 'optim.lr' must be a finite number"),
    (["train", "--output-dir", ""], "output_dir must not be empty"),
    (["train", "--output-dir", "  "], "output_dir must not be empty"),
    (["train", "--data", ""], "config key 'task.data_path' must not be empty"),
    (["train", "--optim.schedule", "step"], "unknown lr schedule"),
    (["train", "--lr"], "argument --optim.lr/--lr: expected one argument"),
    (["train", "--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["trian"], "invalid choice: 'trian'"),
    (["eval", "--num-examples", "many"], "invalid int value: 'many'"),
    (["eval", "--split", "val"], "invalid choice: 'val'"),
    (["train", "--report-to", "comet"], "report_to: unknown logger 'comet'; known: tensorboard, wandb, mlflow, none"),
    (["train", "--report-to", "none,wandb"], "or none alone; got 'none,wandb'"),
    (["train", "--report-to", "wandb,wandb"], "report_to names each logger once"),
])
def test_bad_input_one_line_exit_2(capsys, argv, message):
    assert message in _fail(capsys, argv)


def test_unknown_yaml_key(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 1\n")
    assert "unknown config key 'optim.lrr'" in _fail(capsys, ["train", "--config", str(path)])


def test_bad_values_fail_before_anything_is_written(capsys, tmp_path):
    out = tmp_path / "run"
    _fail(capsys, ["train", "--eps", "inf", "--output-dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("text,message", [
    ("output_dir: {a: 1}\n", "config key 'output_dir' expects str, got {'a': 1}"),
    ("steps: [1, 2]\n", "config key 'steps' expects int"),
    ("optim:\n  lr: .inf\n", "config key 'optim.lr' must be a finite number"),
])
def test_yaml_values_of_the_wrong_shape(capsys, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert message in _fail(capsys, ["train", "--config", str(path)])


def test_yaml_not_utf8(capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("steps: 5\noutput_dir: runs/café\n".encode("latin-1"))
    err = _fail(capsys, ["train", "--config", str(path)])
    assert str(path) in err and "not UTF-8: byte 29 (line 2)" in err


def test_unknown_hub_model_offline(capsys, tmp_path):
    err = _fail(capsys, ["train", "--model", "nobody/no-such-model-xyz", "--output-dir", str(tmp_path / "o")])
    assert "no-such-model-xyz" in err


def test_missing_data_file(capsys, tiny_model_dir, tmp_path):
    err = _fail(capsys, ["train", "--model", str(tiny_model_dir), "--task", "jsonl", "--data",
                         str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o")])
    assert "missing.jsonl" in err


def test_lora_target_matching_nothing(capsys, tiny_model_dir, tmp_path):
    err = _fail(capsys, ["train", "--model", str(tiny_model_dir), "--lora", "--lora.target_modules", "nothing_proj",
                         "--output-dir", str(tmp_path / "o"), "--task.num_train", "8", "--task.num_test", "8",
                         "--task.num_dev", "0"])
    assert "nothing_proj" in err


def test_existing_run_is_not_overwritten(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    log = out / "trajectory.jsonl"
    log.write_text('{"header": {"model": "x"}}\n')
    err = _fail(capsys, ["train", "--model", str(tiny_model_dir), "--output-dir", str(out)])
    assert "--resume" in err
    assert log.read_text() == '{"header": {"model": "x"}}\n' and sorted(p.name for p in out.iterdir()) == ["trajectory.jsonl"]


def test_resume_without_a_run(capsys, tmp_path):
    assert "no run to continue" in _fail(capsys, ["train", "--resume", "--output-dir", str(tmp_path / "empty")])


def test_replay_missing_log(capsys, tiny_model_dir, tmp_path):
    err = _fail(capsys, ["replay", str(tiny_model_dir), str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o")])
    assert "none.jsonl" in err


def test_eval_command(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the movie", "completion": " was good"}) + "\n" for _ in range(10)))
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "jsonl", "--data", str(data),
                 "--num-examples", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["examples"] == 3 and out["loss"] > 0
