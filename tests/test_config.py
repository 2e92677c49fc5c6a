"""Config building: defaults < YAML < flags merged field by field, strict types, readable file errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from distzo.config import TrainConfig, build, coerce, dump_yaml, flat_fields, load_config, to_dict

FLOAT_FIELDS = [name for name, tp, _, _ in flat_fields() if tp is float]


@dataclass
class Deep:
    a: int = 1
    b: int = 2


@dataclass
class Inner:
    deep: Deep = field(default_factory=Deep)
    c: str = "class"


@dataclass
class Outer:
    inner: Inner = field(default_factory=lambda: Inner(Deep(a=10, b=20), c="parent"))


def test_build_merges_at_every_depth():
    cfg = build(Outer(), {"inner": {"deep": {"b": 7}}})
    assert cfg == Outer(Inner(Deep(a=10, b=7), c="parent"))  # the parent's defaults, not the classes'


def test_build_starts_each_section_from_the_default_job():
    default = TrainConfig()
    cfg = load_config(overrides={"optim.eps": 0.01, "task.max_length": 128, "lora.r": 4})
    assert (cfg.optim.lr, cfg.optim.eps) == (default.optim.lr, 0.01)
    assert (cfg.task.num_test, cfg.task.max_length) == (default.task.num_test, 128)
    assert (cfg.lora.r, cfg.lora.alpha) == (4, default.lora.alpha)


def test_yaml_section_and_flag_in_the_same_section_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  eps: 0.01\ntask:\n  max_length: 128\n")
    cfg = load_config(path, {"optim.schedule": "cosine", "task.num_train": "10"})
    expected = TrainConfig()
    expected.optim.eps, expected.optim.schedule = 0.01, "cosine"
    expected.task.max_length, expected.task.num_train = 128, 10
    assert to_dict(cfg) == to_dict(expected)


def test_a_written_config_loads_back(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(TrainConfig()))  # what a run writes into its folder
    assert load_config(path) == TrainConfig()


@pytest.mark.parametrize("key,value", [
    ("output_dir", {"a": 1}),
    ("output_dir", ["a"]),
    ("output_dir", None),
    ("steps", {"a": 1}),
    ("steps", [1]),
    ("optim.lr", [1e-5]),
    ("optim.lr", True),
    ("use_lora", {"a": 1}),
    ("lora.target_modules", {"q_proj": 1}),
    ("lora.target_modules", [["q_proj"]]),
])
def test_wrong_shapes_are_refused(key, value):
    with pytest.raises(ValueError, match=f"config key '{key}' expects"):
        load_config(overrides={key: value})


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", float("inf"), 1e400])
@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(ValueError, match=f"config key '{key}' must be a finite number"):
        load_config(overrides={key: value})


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", 1.5])
def test_ints_must_be_whole_and_finite(value):
    with pytest.raises(ValueError, match="config key 'steps' expects int"):
        load_config(overrides={"steps": value})


@pytest.mark.parametrize("key", ["task.data_path", "model.cache_dir", "model.revision", "output_dir"])
@pytest.mark.parametrize("value", ["", "  "])
def test_empty_paths_are_refused(key, value):
    with pytest.raises(ValueError, match=f"{key}'? must not be empty"):
        load_config(overrides={key: value})


def test_coerce_keeps_what_is_meant():
    assert coerce("q_proj,v_proj", list[str], "k") == ["q_proj", "v_proj"]
    assert coerce("null", str | None, "k") is None and coerce(3, str, "k") == "3"
    assert coerce("1e3", int, "k") == 1000 and coerce(-1, float, "k") == -1.0


def test_bad_schedule_fails_at_build():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        load_config(overrides={"optim.schedule": "step"})
    with pytest.raises(ValueError, match="min_ratio"):
        load_config(overrides={"optim.min_lr_ratio": 2})


def test_yaml_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"steps: 5\noutput_dir: caf\xe9\n")
    with pytest.raises(ValueError, match=r"run\.yaml' is not UTF-8: byte 24 \(line 2\)"):
        load_config(path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\noptim:\n  lr: [1\n")
    with pytest.raises(ValueError, match=r"run\.yaml' is not valid YAML: .* at line 4, column 1"):
        load_config(path)


@pytest.mark.parametrize("old,report_to", [(True, ["tensorboard"]), (False, ["none"]), ("off", ["none"])])
def test_the_old_tensorboard_key_still_loads(tmp_path, old, report_to):
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(TrainConfig()).replace("report_to:\n- tensorboard\n", f"tensorboard: {old}\n"))
    assert "tensorboard: " in path.read_text()  # what runs before report_to wrote
    assert load_config(path).report_to == report_to


def test_the_old_and_new_logger_keys_together_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tensorboard: false\nreport_to: [wandb]\n")
    with pytest.raises(ValueError, match="'tensorboard' was replaced by 'report_to'"):
        load_config(path)
