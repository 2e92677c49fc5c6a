"""The real entry point on a tiny model: logged losses, resume, replay, kills, signals."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reference_mezo import mezo_step
from safetensors.torch import load_file

from distzo.checkpoint import TrajectoryLog, is_complete
from distzo.cli import main
from distzo.config import load_config
from distzo.losses import default_loss
from distzo.models import ModelConfig, load_model
from distzo.replay import replay
from distzo.tasks import get_task, load_task
from distzo.tasks.collate import collate_train
from distzo.trainer import BatchStream


def _args(model_dir, data_dir, out, *extra):
    # full-parameter unless a test passes --lora true
    return ["train", "--lora", "false", "--model", str(model_dir), "--task", "sst2", "--data", str(data_dir), "--output-dir", str(out),
            "--task.num_train", "32", "--task.num_dev", "8", "--task.num_test", "16", "--batch-size", "4",
            "--lr", "1e-2", "--eps", "1e-2", "--progress", "false", "--tensorboard", "false", *extra]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in TrajectoryLog(out / "trajectory.jsonl").read()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_logged_losses_match_reference_mezo(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "5", "--zero_shot", "false")) == 0
    logged = TrajectoryLog(out / "trajectory.jsonl").read()
    assert [r["step"] for r in logged] == list(range(5))
    # the same five steps by MeZO's four-pass reference, on the same batches
    cfg = load_config(overrides={"model.name": str(tiny_model_dir), "task.name": "sst2",
                                 "task.data_path": str(sst2_dir), "task.num_train": 32, "task.num_dev": 8,
                                 "task.num_test": 16})
    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir)))
    stream = BatchStream(load_task(cfg.task).train, 4, 0, cfg.group_by_length)
    for t, record in enumerate(logged):
        batch = collate_train(stream.at(t), tokenizer, get_task("sst2").kind, cfg.task.max_length)
        plus, minus, grads = mezo_step(model, batch, t, lr=1e-2, eps=1e-2,
                                       loss_fn=lambda o, b: default_loss(o.logits, b))
        assert record["loss"] == pytest.approx((plus[0] + minus[0]) / 2, abs=2e-5)
        assert record["grads"][0] == pytest.approx(grads[0], abs=2e-3)
    assert len(set(_losses(out))) == 5  # the weights move: not a constant loss


def test_resume_equals_uninterrupted(tiny_model_dir, sst2_dir, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_args(tiny_model_dir, sst2_dir, whole, "--steps", "6")) == 0
    assert main(_args(tiny_model_dir, sst2_dir, split, "--steps", "3")) == 0
    assert main(_args(tiny_model_dir, sst2_dir, split, "--steps", "6", "--resume")) == 0
    assert _losses(whole) == _losses(split)
    a, b = _weights(whole / "checkpoints" / "last"), _weights(split / "checkpoints" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = json.loads((split / "results.json").read_text())
    assert results["steps"] == 6 and results["zero_shot"] is not None


def test_replay_equals_checkpoint(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "4", "--optim.weight_decay", "0.1")) == 0
    rebuilt = replay(str(tiny_model_dir), out / "trajectory.jsonl", tmp_path / "rebuilt").output
    a, b = _weights(out / "checkpoints" / "last"), _weights(rebuilt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = _weights(tiny_model_dir)
    assert any(not torch.equal(base[k], a[k]) for k in a)  # training changed the weights


def test_lora_run_resumes_and_replays(tiny_model_dir, sst2_dir, tmp_path):
    lora = ["--lora", "true", "--lora.target_modules", "q_proj,v_proj", "--lr", "1e-1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_args(tiny_model_dir, sst2_dir, whole, "--steps", "4", *lora)) == 0
    assert main(_args(tiny_model_dir, sst2_dir, split, "--steps", "2", *lora)) == 0
    assert main(_args(tiny_model_dir, sst2_dir, split, "--steps", "4", "--resume", *lora)) == 0
    assert _losses(whole) == _losses(split)
    merged = _weights(whole / "checkpoints" / "last")
    rebuilt = _weights(replay(str(tiny_model_dir), whole / "trajectory.jsonl", tmp_path / "rebuilt").output)
    assert all(torch.equal(merged[k], rebuilt[k]) for k in merged)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(whole / "checkpoints" / "last")  # plain transformers loads it


def _spawn(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "distzo.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.2)


def test_sigterm_saves_and_exits(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(_args(tiny_model_dir, sst2_dir, out, "--steps", "100000", "--zero_shot", "false"))
    _wait_for(out / "trajectory.jsonl")
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err
    last = out / "checkpoints" / "last"
    assert is_complete(last)
    state = json.loads((last / "distzo_state.json").read_text())
    assert state["step"] == len(_losses(out)) > 0


def test_killed_run_leaves_last_checkpoint_loadable_and_resumes(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(_args(tiny_model_dir, sst2_dir, out, "--steps", "100000", "--save-every", "1",
                        "--zero_shot", "false"))
    _wait_for(out / "checkpoints" / "last" / "COMPLETE")
    time.sleep(1.5)  # land somewhere inside a later save or step
    proc.kill()
    proc.communicate(timeout=60)
    from transformers import AutoModelForCausalLM

    from distzo.checkpoint import readable_checkpoint

    folder = readable_checkpoint(out / "checkpoints" / "last")
    AutoModelForCausalLM.from_pretrained(folder)
    step = json.loads((folder / "distzo_state.json").read_text())["step"]
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", str(step + 2), "--resume")) == 0
    assert [r["step"] for r in TrajectoryLog(out / "trajectory.jsonl").read()] == list(range(step + 2))


def test_nan_losses_abort_and_keep_the_good_checkpoint(tiny_model_dir, sst2_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "2", "--zero_shot", "false")) == 0
    good = _weights(out / "checkpoints" / "last")
    monkeypatch.setattr("distzo.trainer.default_loss", lambda logits, batch: torch.tensor(float("nan")))
    with pytest.warns(UserWarning, match="non-finite loss"):
        code = main(_args(tiny_model_dir, sst2_dir, out, "--steps", "50", "--max_skipped_steps", "2",
                          "--save-every", "1", "--resume"))
    assert code == 3
    assert "non-finite for 3 steps" in capsys.readouterr().err
    kept = _weights(out / "checkpoints" / "last")
    assert all(torch.equal(good[k], kept[k]) for k in good)
    assert all(r["skipped"] for r in TrajectoryLog(out / "trajectory.jsonl").read()[2:])


def test_non_finite_weights_are_never_saved(tiny_model_dir, sst2_dir, tmp_path):
    from distzo.trainer import Trainer, TrainingDiverged

    cfg = load_config(overrides={"model.name": str(tiny_model_dir), "task.name": "sst2", "task.data_path": str(sst2_dir),
                                 "output_dir": str(tmp_path / "run"), "tensorboard": False})
    trainer = Trainer(cfg)
    trainer.opt.params[0].param.data[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="non-finite"):
        trainer._save(trainer.last_dir)
    assert not trainer.last_dir.exists()


def test_batch_stream_epochs_and_grouping():
    from distzo.tasks import Example

    examples = [Example(prompt="x" * random.Random(i).randint(1, 60)) for i in range(50)]
    for grouped in (False, True):
        stream = BatchStream(examples, 4, seed=3, group_by_length=grouped)
        again = BatchStream(examples, 4, seed=3, group_by_length=grouped)
        epoch = [id(e) for t in range(25) for e in stream.at(t)]  # two epochs of 50
        assert sorted(epoch[:50]) == sorted(map(id, examples)) == sorted(epoch[50:])
        assert [id(e) for e in again.at(7)] == epoch[28:32]  # a pure function of (seed, step)
    def padding(s):
        return sum(max(len(e.prompt) for e in s.at(t)) * 4 - sum(len(e.prompt) for e in s.at(t)) for t in range(12))
    assert padding(BatchStream(examples, 4, 3, True)) < 0.5 * padding(BatchStream(examples, 4, 3, False))


def test_offloaded_run_equals_resident_run(tiny_model_dir, sst2_dir, tmp_path):
    # The real entry point with --offload cpu (host buffers, slots and write-backs; on the CPU
    # the copies are synchronous): the same trajectory, eval metrics and checkpoint bit for bit.
    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    extra = ("--steps", "4", "--eval-every", "2")
    assert main(_args(tiny_model_dir, sst2_dir, plain, *extra)) == 0
    assert main(_args(tiny_model_dir, sst2_dir, offloaded, *extra, "--offload", "cpu", "--offload.prefetch", "2")) == 0
    a, b = TrajectoryLog(plain / "trajectory.jsonl").read(), TrajectoryLog(offloaded / "trajectory.jsonl").read()
    assert [(r["loss"], r["grads"]) for r in a] == [(r["loss"], r["grads"]) for r in b]
    assert json.loads((plain / "results.json").read_text())["final"] == json.loads(
        (offloaded / "results.json").read_text())["final"]
    wa, wb = _weights(plain / "checkpoints" / "last"), _weights(offloaded / "checkpoints" / "last")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_each_evaluation_reports_its_time(tiny_model_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_args(tiny_model_dir, sst2_dir, out, "--steps", "2", "--eval-every", "2", "--test-at-best", "false"),
                 "--progress", "true"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval ")]
    assert [line.split(":")[0] for line in lines] == ["eval zero_shot at step 0", "eval dev at step 2",
                                                      "eval test at step 2"]
    assert all(" s (evaluation is " in line and "of the run's time so far)" in line for line in lines)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["eval_seconds"] >= 0 for r in rows if "split" in r)
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["eval_seconds"] <= results["wall_seconds"] + 0.1
