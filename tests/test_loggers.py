"""--report-to: each logger gets the resolved config once and the scalars of metrics.jsonl, through
its own library, offline (TensorBoard event files, wandb's offline run, MLflow's file store)."""

import importlib.util
import json
from pathlib import Path

import pytest
from test_trainer import _args

from distzo.cli import main
from distzo.loggers import scalars

BLOCK = 32768  # W&B's transaction log is LevelDB's log format: records in 32 KiB blocks


@pytest.fixture()
def run(tiny_model_dir, sst2_dir, tmp_path):
    """run(*extra): a 2-step tiny run logging every step, with zero-shot and final evaluations; its folder."""
    def go(*extra) -> Path:
        out = tmp_path / "run"
        assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "2", "--log-every", "1", *extra)) == 0
        return out
    return go


def _expected(out: Path) -> dict[str, dict[int, float]]:
    """What metrics.jsonl says each logger should hold: {scalar name: {step: value}}."""
    expected: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for name, value in scalars(row).items():
            expected.setdefault(name, {})[row["step"]] = value
    assert {"train/loss", "train/loss_last", "zero_shot/accuracy", "test/accuracy"} <= set(expected)
    return expected


def test_tensorboard_gets_the_scalars_and_the_config(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    out = run("--report-to", "tensorboard")
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    for name, by_step in _expected(out).items():
        assert {e.step: pytest.approx(e.value, rel=1e-6) for e in events.Scalars(name)} == by_step, name
    session = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["optim.lr"].number_value == 0.01 and hparams["task.name"].string_value == "sst2"
    assert hparams["lora.target_modules"].string_value == "q_proj,v_proj"


@pytest.mark.parametrize("flags", [("--report-to", "none"), ("--tensorboard", "false")])
def test_none_and_the_old_flag_write_no_logger_files(run, flags):
    out = run(*flags)
    assert not (out / "tb").exists() and not (out / "wandb").exists()


def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB log records (4-byte
    checksum, 2-byte length, 1-byte type) that never cross a block but may be split over several."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, part, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(Record.FromString(part))
            part = b""
    return records


def test_wandb_offline_run_holds_the_scalars_and_the_config(run, tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_CONFIG_DIR": tmp_path / "cfg", "WANDB_CACHE_DIR": tmp_path / "cache",
                        "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))
    import wandb

    out = run("--report-to", "wandb")
    wandb.teardown()  # what exiting the process does: wait until wandb's service has written the run
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(log)
    # the config goes out with the run record, or after it in config records: wandb's timing decides
    updates = [r.run.config if r.HasField("run") else r.config
               for r in records if r.HasField("run") or r.HasField("config")]
    config = {i.key: json.loads(i.value_json) for update in updates for i in update.update}
    assert config["optim.lr"] == 0.01 and config["task.name"] == "sst2" and config["report_to"] == "wandb"
    logged: dict[str, dict[int, float]] = {}
    for r in (r for r in records if r.HasField("history")):
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for name, value in items.items():
            if not name.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                logged.setdefault(name, {})[items["_step"]] = value
    assert logged == _expected(out)
    assert [r.run.project for r in records if r.HasField("run")][0] == "distzo"


def test_mlflow_file_store_holds_the_scalars_and_the_config(run, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a folder suffices here
    out = run("--report-to", "mlflow")
    client = MlflowClient(tracking_uri=uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("distzo").experiment_id])
    assert logged.info.run_name == "run" and logged.info.status == "FINISHED"
    assert logged.data.params["optim.lr"] == "0.01" and logged.data.params["report_to"] == "mlflow"
    for name, by_step in _expected(out).items():
        assert {m.step: m.value for m in client.get_metric_history(logged.info.run_id, name)} == by_step, name


def test_a_missing_logger_package_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    out = tmp_path / "run"
    assert main(["train", "--report-to", "tensorboard,wandb", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "distzo: error: report_to wandb needs the package 'wandb': pip install 'distzo[wandb]'"
    assert not out.exists()


def test_a_logger_that_cannot_start_is_one_line_and_the_run_resumes_without_it(
        run, tiny_model_dir, sst2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    argv = _args(tiny_model_dir, sst2_dir, tmp_path / "run", "--steps", "2", "--report-to", "mlflow")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the data loader's progress lines
    assert err.startswith("distzo: error: could not start the mlflow logger (fix it and continue the run with "
                          "--resume, or leave mlflow out of --report-to): "), err
    assert run("--report-to", "none", "--resume") == tmp_path / "run"
