"""Command-line behaviour: help, config files, and one-line errors with exit code 2 on bad input."""

import json
from pathlib import Path

import pytest
import yaml

from distzo.cli import main, parser
from distzo.config import TrainConfig, load_config

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
])
def test_bad_input_one_line_exit_2(capsys, argv, message):
    assert message in _fail(capsys, argv)


def test_unknown_yaml_key(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 1\n")
    assert "unknown config key 'optim.lrr'" in _fail(capsys, ["train", "--config", str(path)])


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
