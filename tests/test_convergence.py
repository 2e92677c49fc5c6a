"""The convergence harness (bench/convergence.py) on a tiny model: its ZO arm is ``distzo train``,
its AdamW arm learns, its summary counts the passes to a target right, and the offline tasks
import without ``datasets`` (the GPU machine has none)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distzo.checkpoint import TrajectoryLog
from distzo.cli import main as distzo_main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("convergence", ROOT / "bench" / "convergence.py")
convergence = sys.modules["convergence"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(convergence)

SIZES = {"task.num_train": "32", "task.num_dev": "8", "task.num_test": "16", "batch_size": "4"}


def base(model_dir, data_dir) -> dict[str, str]:
    return {"model.name": str(model_dir), "task.name": "sst2", "task.data_path": str(data_dir), **SIZES}


def only_point(text: str):
    arm = convergence.parse_arm(text)
    return arm, arm.points()[0]


@pytest.fixture(scope="module")
def bench(tiny_model_dir, sst2_dir):
    return convergence.Bench(base(tiny_model_dir, sst2_dir))


def test_zo_arm_is_distzo_train(bench, tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    flags = [f"--{k}={v}" for k, v in SIZES.items()]
    assert distzo_main(["train", "--model", str(tiny_model_dir), "--task", "sst2", "--data", str(sst2_dir), *flags,
                        "--lr", "1e-2", "--eps", "1e-2", "--steps", "6", "--eval_every", "3", "--output-dir", str(out),
                        "--progress", "false", "--tensorboard", "false"]) == 0
    arm = convergence.parse_arm("zo:zo:lr=1e-2,eps=1e-2,steps=6,eval_every=3")
    result = bench.run(arm, arm.points()[0], seed=0)
    assert result.losses == [r["loss"] for r in TrajectoryLog(out / "trajectory.jsonl").read()]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained_dev = [(r["step"], r["accuracy"]) for r in metrics if r.get("split") == "dev"]
    assert trained_dev == [(r["step"], r["dev"]["accuracy"]) for r in result.rows[1:]]
    assert [r["forwards"] for r in result.rows] == [0, 6, 12] and result.record["stopped"] is None


def test_zo_arm_counts_the_forwards_it_runs(bench):
    arm = convergence.parse_arm("zo-q3:zo:q=3,estimator=one-sided,steps=2,eval_every=1")
    result = bench.run(arm, arm.points()[0], seed=1)
    # one-sided still runs the batch twice per direction: theta + eps z and theta (one stacked forward)
    assert [r["forwards"] for r in result.rows] == [0, 6, 12]
    assert result.record["config"]["task"]["seed"] == 1 and result.record["config"]["optim"]["directions"] == 3


def test_adamw_arms_learn_and_no_arm_changes_the_base_weights(bench):
    before = {k: v.clone() for k, v in bench.model.state_dict().items()}
    full = bench.run(*only_point("ft:adamw:lr=3e-3"), seed=0)
    steps = 5 * 32 // 4  # five epochs of 32 examples in batches of 4
    assert full.record["steps"] == len(full.losses) == steps and full.rows[-1]["backwards"] == steps
    assert sum(full.losses[-8:]) < sum(full.losses[:8])
    assert full.record["config"]["optim"]["schedule"] == "linear"
    lora = bench.run(*only_point("lora:adamw:lora=true,lora.target_modules=q_proj,v_proj,lr=1e-2,epochs=2"), seed=0)
    assert lora.record["steps"] == 16 and lora.record["config"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    zo_lora = bench.run(*only_point("zo-lora:zo:lora=true,steps=2,lr=1e-2,eps=1e-2"), seed=0)
    assert zo_lora.record["steps_done"] == 2 and zo_lora.record["stopped"] is None
    assert all(torch.equal(before[k], v) for k, v in bench.model.state_dict().items())


def test_sparse_and_hybrid_arms_run_as_distzo_train_runs_them(bench, tiny_model_dir, sst2_dir, tmp_path):
    """The hybrid option's setting is a pattern list (commas inside a setting): the harness passes it
    whole and its run is distzo train's, loss for loss; a sparse arm runs its own algorithm."""
    before = {k: v.clone() for k, v in bench.model.state_dict().items()}
    hybrid, point = only_point("hyb:zo:optim.first_order=model.norm.weight,model.layers.1.*,"
                               "optim.first_order_lr=1e-2,lr=1e-2,eps=1e-2,steps=3,eval_every=3")
    assert point["optim.first_order"] == "model.norm.weight,model.layers.1.*"
    run = bench.run(hybrid, point, seed=0)
    assert run.record["config"]["optim"]["first_order"] == ["model.norm.weight", "model.layers.1.*"]
    out = tmp_path / "hyb"
    flags = [f"--{k}={v}" for k, v in SIZES.items()]
    assert distzo_main(["train", "--model", str(tiny_model_dir), "--task", "sst2", "--data", str(sst2_dir), *flags,
                        "--optim.first_order", "model.norm.weight,model.layers.1.*", "--optim.first_order_lr", "1e-2",
                        "--lr", "1e-2", "--eps", "1e-2", "--steps", "3", "--eval_every", "3", "--output-dir", str(out),
                        "--progress", "false", "--tensorboard", "false"]) == 0
    assert run.losses == [r["loss"] for r in TrajectoryLog(out / "trajectory.jsonl").read()]
    sparse = bench.run(*only_point("sp:zo:optim.algorithm=sparse,lr=1e-2,eps=1e-2,steps=3,eval_every=3"), seed=0)
    assert sparse.record["config"]["optim"]["algorithm"] == "sparse" and len(sparse.losses) == 3
    assert sparse.losses != run.losses
    assert all(torch.equal(before[k], v) for k, v in bench.model.state_dict().items())


def test_a_qlora_bench_runs_as_distzo_train_runs_it(tiny_model_dir, sst2_dir, tmp_path):
    """A harness whose base is quantized (``--set model.quantize=nf4,lora=true``): each run copies the
    quantized base and trains fresh adapters, loss for loss as ``distzo train --quantize nf4 --lora``."""
    pytest.importorskip("bitsandbytes")
    qlora = convergence.Bench({**base(tiny_model_dir, sst2_dir), "model.quantize": "nf4", "use_lora": "true"})
    before = {k: v.clone() for k, v in qlora.model.state_dict().items()}
    arm, point = only_point("qlora:zo:lr=1e-2,eps=1e-2,steps=4,eval_every=2")
    runs = [qlora.run(arm, point, seed=0) for _ in range(2)]
    out = tmp_path / "qlora"
    flags = [f"--{k}={v}" for k, v in SIZES.items()]
    assert distzo_main(["train", "--model", str(tiny_model_dir), "--task", "sst2", "--data", str(sst2_dir), *flags,
                        "--quantize", "nf4", "--lora", "--lr", "1e-2", "--eps", "1e-2", "--steps", "4",
                        "--eval_every", "2", "--output-dir", str(out), "--progress", "false",
                        "--tensorboard", "false"]) == 0
    trained = [r["loss"] for r in TrajectoryLog(out / "trajectory.jsonl").read()]
    assert runs[0].losses == runs[1].losses == trained and len(trained) == 4
    assert runs[0].record["config"]["model"]["quantize"] == "nf4" and runs[0].record["config"]["use_lora"]
    assert all(torch.equal(before[k], v) for k, v in qlora.model.state_dict().items())


def test_evaluations_record_the_adaptive_eps_factor(bench):
    arm, point = only_point("band:zo:optim.eps_band_low=10,optim.eps_band_high=20,lr=1e-2,eps=1e-2,steps=4,eval_every=2")
    rows = bench.run(arm, point, seed=0).rows
    # |L+ - L-| of a tiny model's batch is far below the band: eps grows by 1.25x a step
    assert [r.get("algorithm") for r in rows] == [None, {"eps_factor": 1.25**2}, {"eps_factor": 1.25**4}]
    plain = bench.run(*only_point("zo:zo:lr=1e-2,eps=1e-2,steps=2,eval_every=2"), seed=0).rows
    assert all("algorithm" not in r for r in plain)


def test_settings_and_grids_parse_and_refuse_what_does_not_apply():
    assert convergence.parse_settings("lora.target_modules=q_proj,v_proj,lr=1e-4,q=2") == {
        "lora.target_modules": "q_proj,v_proj", "optim.lr": "1e-4", "optim.directions": "2"}
    arms = [convergence.parse_arm("a:zo:steps=10"), convergence.parse_arm("b:adamw")]
    convergence.add_grid(arms, "lr=1e-5,1e-4")
    convergence.add_grid(arms, "a:eps=1e-3,1e-2")
    assert [convergence.label(p) for p in arms[0].points()] == [
        f"eps={eps},lr={lr},steps=10" for eps in ("1e-3", "1e-2") for lr in ("1e-5", "1e-4")]
    assert convergence.label(convergence.parse_arm("c:zo").points()[0]) == "default"
    assert arms[1].grid == {"optim.lr": ["1e-5", "1e-4"]}
    with pytest.raises(ValueError, match="names no arm"):
        convergence.add_grid(arms, "c:lr=1")
    with pytest.raises(ValueError, match="NAME:FAMILY"):
        convergence.parse_arm("x:sgd")
    with pytest.raises(ValueError, match="optim.eps do not apply to adamw"):
        convergence.arm_config({}, *only_point("b:adamw:eps=1e-3"), 0)
    with pytest.raises(ValueError, match="epochs is for adamw"):
        convergence.arm_config({}, *only_point("a:zo:epochs=2"), 0)


def _history(run: str, arm: str, dev: list[float], forwards: int, backwards: int = 0) -> list[dict]:
    return [{"run": run, "arm": arm, "step": 10 * i, "forwards": forwards * i, "backwards": backwards * i,
             "train_seconds": 0.5 * i, "dev": {"accuracy": a}} for i, a in enumerate(dev)]


def _record(run: str, arm: str, point: str, seed: int, best: float, stopped=None) -> dict:
    return {"run": run, "arm": arm, "family": "zo", "point": point, "seed": seed, "metric": "accuracy", "higher": True,
            "stopped": stopped, "best_dev": {"accuracy": best}, "test_at_best_dev": {"accuracy": best - 0.1},
            "zero_shot_test": {"accuracy": 0.5}}


def test_passes_to_target_on_a_synthetic_history():
    rows = (_history("zo 0", "zo", [0.5, 0.6, 0.8, 0.7], forwards=20)
            + _history("zo 1", "zo", [0.5, 0.6, 0.6, 0.6], forwards=20)
            + _history("zo-bad 0", "zo", [0.5, 0.5], forwards=20)
            + _history("ft 0", "ft", [0.5, 0.72, 0.75], forwards=10, backwards=10)
            + _history("ft 1", "ft", [0.5, 0.69, 0.71], forwards=10, backwards=10))
    records = [_record("zo 0", "zo", "lr=1", 0, 0.8), _record("zo 1", "zo", "lr=1", 1, 0.6),
               _record("zo-bad 0", "zo", "lr=9", 0, 0.5), _record("ft 0", "ft", "lr=2", 0, 0.75),
               _record("ft 1", "ft", "lr=2", 1, 0.71), _record("ft 2", "ft", "lr=2", 2, 0.9, stopped="time budget")]
    summary = convergence.summarize(rows, records, target_arm="zo")
    assert summary["target"]["value"] == pytest.approx(0.7)  # zo's mean best dev over seeds 0 and 1
    zo, ft = summary["arms"]["zo"], summary["arms"]["ft"]
    assert zo["chosen"] == "lr=1" and zo["seeds"] == [0, 1] and zo["grid"]["lr=9"]["mean"] == 0.5
    assert zo["to_target"]["reached"] == 1 and zo["to_target"]["of"] == 2
    assert zo["to_target"]["forwards"]["values"] == [40] and zo["to_target"]["step"]["values"] == [20]
    assert ft["incomplete"] == ["ft 2"] and ft["best_dev"]["n"] == 2
    assert ft["to_target"]["reached"] == 2
    assert ft["to_target"]["forwards"]["values"] == [10, 20]
    assert ft["to_target"]["passes"]["mean"] == pytest.approx((30 + 60) / 2)  # a backward counts as two forwards
    assert ft["to_target"]["train_seconds"]["values"] == [0.5, 1.0]
    lower = [{"step": 0, "dev": {"loss": 3.0}}, {"step": 5, "dev": {"loss": 2.0}}]
    assert convergence.first_reaching(lower, "loss", 2.5, higher=False)["step"] == 5
    assert convergence.summarize(rows, records, target=0.9)["arms"]["zo"]["to_target"]["reached"] == 0


def test_time_budget_cuts_a_run_and_skips_the_next(bench):
    arm = convergence.parse_arm("long:zo:steps=100000,eval_every=100000,lr=1e-3")
    bench.deadline = time.monotonic() + 1.0
    try:
        cut = bench.run(arm, arm.points()[0], seed=0)
        assert cut.record["stopped"] == "time budget" and 0 < cut.record["steps_done"] < 100000
        assert cut.rows[-1]["step"] == cut.record["steps_done"]  # evaluated where it stopped
        assert bench.run(arm, arm.points()[0], seed=1) is None
    finally:
        bench.deadline = float("inf")


def test_command_line_runs_the_grid_then_the_seeds(tiny_model_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    settings = ",".join(f"{k}={v}" for k, v in base(tiny_model_dir, sst2_dir).items() if not k.startswith("model."))
    assert convergence.main(["run", "--model", str(tiny_model_dir), "--set", settings,
                             "--arm", "zo:zo:steps=4,eval_every=2", "--grid", "zo:lr=1e-3,1e-2",
                             "--arm", "ft:adamw:epochs=1,lr=1e-3,eval_every=4",
                             "--seeds", "0,1", "--target-arm", "zo", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    chosen = summary["arms"]["zo"]["chosen"]
    zo, ft = "eval_every=2,lr={},steps=4", "epochs=1,eval_every=4,lr=1e-3"
    assert [(r["arm"], r["point"], r["seed"]) for r in records] == [
        ("zo", zo.format("1e-3"), 0), ("zo", zo.format("1e-2"), 0), ("ft", ft, 0), ("zo", chosen, 1), ("ft", ft, 1)]
    assert summary["arms"]["zo"]["seeds"] == [0, 1] and summary["arms"]["ft"]["to_target"]["of"] == 2
    rows = (out / "evals.jsonl").read_text().splitlines()
    assert len(rows) == 3 * 3 + 2 * 3  # zo: steps 0, 2, 4; ft: 8 steps evaluated at 0, 4, 8
    merged = tmp_path / "merged"
    assert convergence.main(["summarize", str(out), str(out), "--target", "0.5", "--out", str(merged)]) == 0
    assert json.loads((merged / "summary.json").read_text())["arms"]["zo"]["seeds"] == [0, 1]


def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", str(tiny_model_dir), "--task", "sst2", "--set", f"task.data_path={sst2_dir}", "--out", str(out)]
    for argv, says in ((["run", *common, "--arm", "zo:zo:nonsense=1"], "unknown config key 'nonsense'"),
                       (["run", *common, "--arm", "zo:zo:steps=2", "--seeds", "0,x"], "comma-separated integers"),
                       (["run", *common, "--arm", "zo:sgd"], "is not NAME:FAMILY"),
                       (["summarize", str(tmp_path), "--out", str(out)], "no runs.jsonl")):
        capsys.readouterr()
        assert convergence.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err and err.startswith("convergence: error: ")
        assert not out.exists()  # refused before the bench was built


def test_offline_tasks_and_the_harness_import_without_datasets():
    code = (
        "import sys, runpy; sys.modules['datasets'] = None\n"
        "import distzo.trainer\n"
        "from distzo.tasks import TaskConfig, load_task\n"
        "for name in ('debates', 'rotten_tomatoes', 'text'):\n"
        "    assert load_task(TaskConfig(name=name, num_train=8, num_dev=4, num_test=4)).train\n"
        f"runpy.run_path({str(ROOT / 'bench' / 'convergence.py')!r})\n"
        "assert sys.modules['datasets'] is None\n"
    )
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
