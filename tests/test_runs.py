"""What a run promises about its output folder, through ``distzo`` itself: one writer, resume
guarded and exact (from a checkpoint or from the log alone), refusals that write nothing,
one-line errors, and the records a user reads."""

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from test_trainer import _args, _losses, _spawn, _weights

from distzo.checkpoint import TrajectoryLog
from distzo.cli import main


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys, code, argv) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("distzo: "), err
    return err


def _wait_for_steps(out: Path, n: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    log = out / "trajectory.jsonl"
    while not (log.exists() and len(TrajectoryLog(log).read()) >= n):
        assert time.time() < end, f"{log} never reached {n} steps"
        time.sleep(0.1)


def _same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)
    wa, wb = _weights(a / "checkpoints" / "last"), _weights(b / "checkpoints" / "last")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture()
def run(tiny_model_dir, sst2_dir, tmp_path):
    """args(out, *extra): the tiny run's argv."""
    return lambda out, *extra: _args(tiny_model_dir, sst2_dir, out, "--zero_shot", "false", *extra)


# ---------------------------------------------------------------- one writer


def test_a_second_writer_is_refused(run, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _spawn(run(out, "--steps", "100000"))
    try:
        _wait_for_steps(out, 1)
        for extra in (("--resume",), ()):
            err = _one_line(capsys, 2, run(out, "--steps", "100000", *extra))
            assert "in use by another distzo run" in err and f"pid {proc.pid}" in err
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    steps = [r["step"] for r in TrajectoryLog(out / "trajectory.jsonl").read()]
    state = json.loads((out / "checkpoints" / "last" / "distzo_state.json").read_text())
    assert steps == list(range(state["step"]))  # the first writer's trajectory is whole


# ---------------------------------------------------------------- resume


def test_killed_before_its_first_checkpoint_resumes_from_the_log(run, tmp_path):
    out = tmp_path / "killed"
    proc = _spawn(run(out, "--steps", "100000", "--save-every", "0"))
    _wait_for_steps(out, 3)
    proc.kill()
    proc.communicate(timeout=60)
    assert not (out / "checkpoints").exists()
    total = len(_losses(out)) + 2
    assert main(run(out, "--steps", str(total), "--resume")) == 0
    assert main(run(tmp_path / "whole", "--steps", str(total))) == 0
    _same_run(out, tmp_path / "whole")


def test_resume_with_no_flags_takes_the_runs_own_config(run, tmp_path):
    out, whole = tmp_path / "run", tmp_path / "whole"
    assert main(run(out, "--steps", "2", "--optim.schedule", "cosine")) == 0
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4"]) == 0
    assert main(run(whole, "--steps", "2", "--optim.schedule", "cosine")) == 0
    assert main(run(whole, "--steps", "4", "--optim.schedule", "cosine", "--resume")) == 0
    _same_run(out, whole)


@pytest.mark.parametrize("flags,named", [
    (("--batch-size", "8"), "batch_size (4 -> 8)"),
    (("--lr", "1e-3"), "optim.lr (0.01 -> 0.001)"),
    (("--optim.schedule", "linear"), "optim.schedule"),
    (("--task.num_train", "16"), "task.num_train"),
    (("--seed", "3"), "seed"),
])
def test_resume_refuses_changed_settings_and_writes_nothing(run, tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    assert main(run(out, "--steps", "2")) == 0
    before = _snapshot(out)
    err = _one_line(capsys, 2, run(out, "--steps", "4", "--resume", *flags))
    assert named in err and "cannot change when a run resumes" in err
    assert _snapshot(out) == before


def test_accepted_resume_changes_are_logged(run, tmp_path):
    out = tmp_path / "run"
    assert main(run(out, "--steps", "2")) == 0
    assert main(run(out, "--steps", "3", "--resume", "--log-every", "1")) == 0
    events = TrajectoryLog(out / "trajectory.jsonl").events()
    assert [(e["event"], e["step"]) for e in events] == [("resume", 2)]
    assert events[0]["changes"] == {"steps": [2, 3], "log_every": [10, 1]}


@pytest.mark.parametrize("damage", ["torn last line", "emptied", "deleted", "another run's log"])
def test_resume_refuses_a_log_that_no_longer_rebuilds_the_checkpoint(run, tmp_path, capsys, damage):
    out, other = tmp_path / "run", tmp_path / "other"
    assert main(run(out, "--steps", "3")) == 0
    log = out / "trajectory.jsonl"
    if damage == "torn last line":
        text = log.read_text()
        log.write_text(text[: text.rstrip("\n").rfind("\n") + 10])
    elif damage == "emptied":
        log.write_text("")
    elif damage == "deleted":
        log.unlink()
    else:  # same settings but another data order: same header, other steps
        assert main(run(other, "--steps", "3", "--seed", "1")) == 0
        shutil.copy(other / "trajectory.jsonl", log)
        shutil.copy(other / "config.yaml", out / "config.yaml")
    before = _snapshot(out)
    err = _one_line(capsys, 2, run(out, "--steps", "5", "--resume", *(("--seed", "1") if other.exists() else ())))
    assert "--resume" in err and ("rebuilds" in err or "different runs" in err or "no run" in err), err
    assert _snapshot(out) == before


def test_torn_metrics_line_does_not_block_resume(run, tmp_path):
    out = tmp_path / "run"
    assert main(run(out, "--steps", "2", "--log-every", "1")) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert main(run(out, "--steps", "3", "--resume", "--log-every", "1")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "split" not in r] == [1, 2, 3]


def test_a_folder_of_someone_elses_files_is_left_alone(run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my: own\n")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = _snapshot(out)
    assert "holds files but no distzo run" in _one_line(capsys, 2, run(out, "--steps", "2"))
    assert "no run to continue" in _one_line(capsys, 2, run(out, "--steps", "2", "--resume"))
    assert _snapshot(out) == before


# ---------------------------------------------------------------- signals and failures


def test_a_signal_during_the_zero_shot_eval_stops_cleanly(tiny_model_dir, sst2_dir, tmp_path, capsys, monkeypatch):
    import distzo.trainer

    out, whole = tmp_path / "run", tmp_path / "whole"
    real = distzo.trainer.evaluate

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the trainer's handler inside this call
        return real(*args, **kwargs)

    monkeypatch.setattr(distzo.trainer, "evaluate", interrupted)
    err = _one_line(capsys, 130, _args(tiny_model_dir, sst2_dir, out, "--steps", "3"))
    assert "stopped by SIGINT at step 0" in err
    monkeypatch.setattr(distzo.trainer, "evaluate", real)
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "3", "--resume")) == 0
    assert main(_args(tiny_model_dir, sst2_dir, whole, "--steps", "3")) == 0
    _same_run(out, whole)
    assert json.loads((out / "results.json").read_text())["zero_shot"] is not None


def test_a_second_signal_stops_at_once_and_the_run_resumes(run, tmp_path, capsys, monkeypatch):
    from distzo.optimizer import ZOOptimizer

    out, whole = tmp_path / "run", tmp_path / "whole"
    real = ZOOptimizer.step

    def step(self, batch):
        if self.step_count == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch)

    monkeypatch.setattr(ZOOptimizer, "step", step)
    assert "second signal" in _one_line(capsys, 130, run(out, "--steps", "5"))
    monkeypatch.setattr(ZOOptimizer, "step", real)
    assert main(run(out, "--steps", "5", "--resume")) == 0
    assert main(run(whole, "--steps", "5")) == 0
    _same_run(out, whole)


def test_a_full_disk_is_one_line_and_the_run_resumes(run, tmp_path, capsys, monkeypatch):
    out, whole = tmp_path / "run", tmp_path / "whole"
    real = TrajectoryLog.append

    def append(self, step, *args, **kwargs):
        if step == 3:  # half a line reaches the disk, then it is full
            self._handle().write(b'{"step": 3, "seeds": [1')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(TrajectoryLog, "append", append)
    assert "No space left on device" in _one_line(capsys, 2, run(out, "--steps", "6", "--save-every", "2"))
    monkeypatch.setattr(TrajectoryLog, "append", real)
    assert main(run(out, "--steps", "6", "--resume")) == 0
    assert main(run(whole, "--steps", "6", "--save-every", "2")) == 0
    _same_run(out, whole)


def test_unusable_output_paths_are_one_line_and_write_nothing(run, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "below a file" in _one_line(capsys, 2, run(afile / "run", "--steps", "1"))
    assert "not a folder" in _one_line(capsys, 2, run(afile, "--steps", "1"))
    # Read-only: tests may run as root, for whom permissions do not apply; ask os.access.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert "not writable" in _one_line(capsys, 2, run(tmp_path / "new", "--steps", "1"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage", ["config.json", "model.safetensors", "tokenizer"])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_damaged_model_folder_is_one_line(tiny_model_dir, sst2_dir, tmp_path, capsys, damage, command):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if damage == "tokenizer":
        for p in model.glob("tokenizer*"):
            p.unlink()
    else:
        data = (model / damage).read_bytes()
        (model / damage).write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    argv = (_args(model, sst2_dir, out, "--steps", "1") if command == "train"
            else ["eval", "--model", str(model), "--task", "sst2", "--data", str(sst2_dir), "--num-examples", "4"])
    err = _one_line(capsys, 2, argv)
    assert str(model) in err
    assert not out.exists()


def test_a_run_from_before_report_to_resumes(run, tmp_path):
    out = tmp_path / "run"
    assert main(run(out, "--steps", "2", "--report-to", "none")) == 0
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("report_to:\n- none\n", "tensorboard: false\n"))
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "3"]) == 0
    assert "report_to:\n- none\n" in config.read_text() and not (out / "tb").exists()
    assert [e["changes"] for e in TrajectoryLog(out / "trajectory.jsonl").events()] == [{"steps": [2, 3]}]


# ---------------------------------------------------------------- records


def test_logged_loss_is_the_mean_of_its_window(run, tmp_path):
    out = tmp_path / "run"
    assert main(run(out, "--steps", "4", "--log-every", "2")) == 0
    losses = _losses(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [2, 4]
    for row, window in zip(train, (losses[:2], losses[2:])):
        assert row["loss"] == pytest.approx(sum(window) / 2, rel=1e-12) and row["loss_last"] == window[-1]
        assert row["tokens_per_s"] > 0


def test_results_report_test_at_the_best_dev_checkpoint(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "4", "--eval-every", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    best = results["best_dev"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    at_best = [r for r in rows if r.get("split") == "test_at_best_dev" and r["step"] == best["step"]]
    assert results["test_at_best_dev"] == best["test"] == {"accuracy": at_best[-1]["accuracy"]}
    assert all("eval_seconds" in r for r in rows if "split" in r)


def test_checkpoint_state_is_plain_json_with_exact_seeds(run, tmp_path):
    out = tmp_path / "run"
    assert main(run(out, "--steps", "2")) == 0
    last = out / "checkpoints" / "last"
    assert not (last / "trainer_state.json").exists() and not (last / "optimizer.pt").exists()
    state = json.loads((last / "distzo_state.json").read_text())
    optimizer = json.loads((last / "optimizer.json").read_text())
    assert optimizer["step"] == state["step"] == 2
    logged = TrajectoryLog(out / "trajectory.jsonl").read()[-1]
    assert [int(s) for s in state["log_tail"]["seeds"]] == logged["seeds"]
    assert all(isinstance(s, str) for s in state["log_tail"]["seeds"])
