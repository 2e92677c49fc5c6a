"""Each algorithm against its float64 reference, on the offload engine, and through
``distzo train``, ``--resume`` and ``distzo replay`` (invariant 5)."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from reference_fzoo import fzoo_step
from reference_mezo import mezo_step
from reference_momentum import MomentumReference
from safetensors.torch import load_file
from tiny_models import tiny_batch, tiny_model

from distzo import records
from distzo.algorithms.eps import BOUNDS, STEP, EpsRule
from distzo.algorithms.fzoo import FZOO
from distzo.algorithms.mezo import MeZO
from distzo.algorithms.momentum import Momentum
from distzo.cli import main
from distzo.offload import OffloadConfig, OffloadEngine
from distzo.optimizer import ZOOptimizer, causal_lm_loss
from distzo.schedules import Schedule

LR, EPS, WD, STEPS = 1e-3, 1e-3, 0.1, 20


def _max_diff(a, b) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters()))


def _losses_match(got, want) -> None:
    assert [len(row) for row in got] == [len(row) for row in want]
    assert got == [pytest.approx(row, abs=1e-11) for row in want]


# --------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("family,kind", [("llama", "rademacher"), ("opt", "gaussian"), ("opt", "rademacher-packed"),
                                         ("llama", "rademacher-shared")])
def test_fzoo_matches_its_reference(family, kind):
    model = tiny_model(family, dtype=torch.float64)
    ref = copy.deepcopy(model)
    opt = ZOOptimizer(model, perturbation=kind, algorithm=FZOO(lr=LR, eps=EPS, weight_decay=WD, probes=4))
    for t in range(STEPS):
        batch = tiny_batch(seed=t)
        stats = opt.step(batch)
        want = fzoo_step(ref, batch, t, lr=LR, eps=EPS, probes=4, weight_decay=WD, kind=kind,
                         loss_fn=causal_lm_loss)
        _losses_match(stats.losses, [want])
        assert stats.update.divisor == 1 and len(stats.update.seeds) == 4
    opt.flush()
    assert _max_diff(model, ref) < 1e-12


@pytest.mark.parametrize("family,beta,history,q", [("llama", 0.9, 4, 1), ("opt", 0.5, 3, 2), ("llama", 0.0, 2, 1)])
def test_momentum_matches_its_reference(family, beta, history, q):
    model = tiny_model(family, dtype=torch.float64)
    ref = MomentumReference(copy.deepcopy(model), lr=LR, eps=EPS, beta=beta, history=history, q=q, weight_decay=WD)
    opt = ZOOptimizer(model, algorithm=Momentum(beta=beta, history=history, lr=LR, eps=EPS, weight_decay=WD,
                                                directions=q))
    for t in range(STEPS):
        batch = tiny_batch(seed=t)
        stats = opt.step(batch)
        _losses_match(stats.losses, ref.step(batch, t, causal_lm_loss))
        assert len(stats.update.seeds) == q * min(history, t + 1)
    opt.flush()
    assert _max_diff(model, ref.model) < 1e-12


@pytest.mark.parametrize("family,beta,beta2,history,q", [("llama", 0.9, 0.99, 4, 1), ("opt", 0.5, 0.9, 3, 2),
                                                         ("llama", 0.0, 0.0, 2, 1)])
def test_adam_momentum_matches_its_reference(family, beta, beta2, history, q):
    model = tiny_model(family, dtype=torch.float64)
    lr = 1e-5  # the adam rule moves each element about lr a step
    ref = MomentumReference(copy.deepcopy(model), lr=lr, eps=EPS, beta=beta, history=history, q=q, weight_decay=WD,
                            rule="adam", beta2=beta2)
    opt = ZOOptimizer(model, algorithm=Momentum(beta=beta, history=history, rule="adam", beta2=beta2, lr=lr, eps=EPS,
                                                weight_decay=WD, directions=q))
    start = copy.deepcopy(model)
    for t in range(STEPS):
        batch = tiny_batch(seed=t)
        stats = opt.step(batch)
        _losses_match(stats.losses, ref.step(batch, t, causal_lm_loss))
        assert [n for n, _, _ in stats.update.adam] == [q] * min(history, t + 1)
    opt.flush()
    assert _max_diff(model, ref.model) < 1e-12
    assert _max_diff(model, start) > 10 * lr  # it moved, by the adam rule's scale


def test_adam_momentum_at_its_first_step_is_sign_descent():
    # n = 1: m / (sqrt(v) + delta) = d / (|d| + delta), so each element moves by just under lr
    # (delta shows where |d| is small)
    model = tiny_model("llama", dtype=torch.float64)
    before = copy.deepcopy(model)
    opt = ZOOptimizer(model, algorithm=Momentum(rule="adam", lr=1e-4, eps=EPS, directions=2))
    opt.step(tiny_batch(seed=0))
    opt.flush()
    moves = torch.cat([(b - a).detach().flatten().abs() for a, b in zip(model.parameters(), before.parameters())])
    assert float(moves.max()) <= 1e-4 and float(moves.min()) > 0.95e-4


def test_heavy_ball_records_and_settings_keep_their_fields():
    # heavy-ball's records, log lines, saved pending updates and header settings are those it wrote
    # before the adam rule: old logs resume and replay, new ones read as before
    algo = Momentum(beta=0.8, history=3, lr=LR, eps=EPS, directions=2)
    for t in range(4):
        result = algo.finish(t, [[1.0 + 0.1 * t, 0.9], [1.2, 1.1 - 0.05 * t]])
        line = records.log_fields(result.update)
        assert set(line) == {"step", "seeds", "grads", "lr", "divisor", "decay", "rounding_seed"}
        assert records.from_log(json.loads(json.dumps(line)), 0.0) == result.update
        assert set(records.state_fields(result.update)) == {"step", "seeds", "coeffs", "lr", "divisor", "decay",
                                                            "rounding_seed"}
    assert set(algo.settings()) == {"beta", "history", "transform", "clip"}
    assert "rule" not in algo.state_dict()


def test_adam_records_round_trip_through_the_log_and_the_saved_state():
    algo = Momentum(rule="adam", history=3, lr=LR, eps=EPS, directions=2)
    for t in range(4):
        update = algo.finish(t, [[1.0 + 0.1 * t, 0.9], [1.2, 1.1 - 0.05 * t]]).update
        assert records.from_log(json.loads(json.dumps(records.log_fields(update))), 0.0) == update
        assert records.UpdateRecord(**json.loads(json.dumps(records.state_fields(update)))) == update
    again = Momentum(lr=LR, eps=EPS, directions=2)
    again.load_state_dict(json.loads(json.dumps(algo.state_dict())))
    assert again.update(4) == algo.update(4) and again.settings() == algo.settings()


def test_momentum_with_one_step_of_history_is_zo_sgd():
    a, b = tiny_model("llama", dtype=torch.float64), tiny_model("llama", dtype=torch.float64)
    heavy = ZOOptimizer(a, algorithm=Momentum(beta=0.9, history=1, lr=LR, eps=EPS, directions=2))
    plain = ZOOptimizer(b, lr=LR, eps=EPS, directions=2)
    for t in range(5):
        x, y = heavy.step(tiny_batch(seed=t)), plain.step(tiny_batch(seed=t))
        _losses_match(x.losses, y.losses)
    heavy.flush()
    plain.flush()
    assert _max_diff(a, b) < 1e-13


@pytest.mark.parametrize("transform,coeff", [("sign", lambda g: math.copysign(1.0, g)),
                                             ("clip", lambda g: max(-0.5, min(0.5, g)))])
def test_sign_and_clipped_zo_sgd_match_the_reference(transform, coeff):
    model = tiny_model("llama", dtype=torch.float64)
    ref = copy.deepcopy(model)
    opt = ZOOptimizer(model, algorithm=MeZO(lr=LR, eps=EPS, weight_decay=WD, directions=2, transform=transform,
                                            clip=0.5))
    for t in range(STEPS):
        batch = tiny_batch(seed=t)
        stats = opt.step(batch)
        plus, minus, grads = mezo_step(ref, batch, t, lr=LR, eps=EPS, weight_decay=WD, q=2, loss_fn=causal_lm_loss,
                                       coeff=coeff)
        _losses_match(stats.losses, [list(pair) for pair in zip(plus, minus)])
        assert list(stats.update.coeffs) == [coeff(g) for g in stats.projected_grads]
    opt.flush()
    assert _max_diff(model, ref) < 1e-12


def test_eps_schedule_and_adaptive_eps_match_the_reference():
    # the reference is told each step's eps by the obvious rule: schedule x a factor that grows
    # by STEP while the mean |L+ - L-| is below the band and shrinks above it
    model = tiny_model("llama", dtype=torch.float64)
    ref = copy.deepcopy(model)
    schedule = Schedule("cosine", 0, STEPS, 0.1)
    band = (2e-4, 5e-4)
    rule = EpsRule(1e-2, schedule, band)
    opt = ZOOptimizer(model, algorithm=MeZO(lr=LR, eps=1e-2, weight_decay=WD, eps_rule=rule))
    factor, moved = 1.0, set()
    for t in range(STEPS):
        eps = 1e-2 * schedule.factor(t) * factor
        batch = tiny_batch(seed=t)
        stats = opt.step(batch)
        plus, minus, _ = mezo_step(ref, batch, t, lr=LR, eps=eps, weight_decay=WD, loss_fn=causal_lm_loss)
        _losses_match(stats.losses, [[plus[0], minus[0]]])
        diff = abs(plus[0] - minus[0])
        factor = min(factor * STEP, BOUNDS[1]) if diff < band[0] else max(factor / STEP, BOUNDS[0]) if diff > band[1] \
            else factor
        moved.add(factor)
        assert stats.log == {"eps_factor": factor}
    opt.flush()
    assert len(moved) > 2  # the band made eps move both ways or far
    assert _max_diff(model, ref) < 1e-12


# --------------------------------------------------------------------------- engines


def _algorithm(name: str):
    if name == "fzoo":
        return FZOO(lr=LR, eps=EPS, weight_decay=WD, probes=3)
    if name == "momentum-adam":
        return Momentum(beta=0.8, history=3, rule="adam", lr=LR, eps=EPS, weight_decay=WD, directions=2)
    return Momentum(beta=0.8, history=3, lr=LR, eps=EPS, weight_decay=WD, directions=2)


@pytest.mark.parametrize("name", ["fzoo", "momentum", "momentum-adam"])
@pytest.mark.parametrize("write_every", [1, 3])
def test_offloaded_equals_resident_bit_for_bit(name, write_every):
    resident = tiny_model("llama")
    offloaded = copy.deepcopy(resident)
    engine = OffloadEngine(offloaded, "cpu", OffloadConfig("cpu", write_every=write_every))
    a = ZOOptimizer(resident, algorithm=_algorithm(name))
    b = ZOOptimizer(offloaded, algorithm=_algorithm(name), offload=engine)
    for t in range(6):
        x, y = a.step(tiny_batch(seed=t)), b.step(tiny_batch(seed=t))
        assert (x.losses, x.update) == (y.losses, y.update)
    a.flush()
    b.flush()
    assert all(torch.equal(x, y) for x, y in zip(resident.state_dict().values(), offloaded.state_dict().values()))
    # every probe of a step in one forward: the blocks come up as often as for MeZO's one pair
    pair = copy.deepcopy(resident)
    pair_engine = OffloadEngine(pair, "cpu", OffloadConfig("cpu", write_every=write_every))
    mezo = ZOOptimizer(pair, algorithm=MeZO(lr=LR, eps=EPS), offload=pair_engine)
    for t in range(6):
        mezo.step(tiny_batch(seed=t))
    mezo.flush()
    assert engine.uploads == pair_engine.uploads


# --------------------------------------------------------------------------- the entry point


def _train(model_dir, data_dir, out, *extra) -> None:
    argv = ["train", "--lora", "false", "--model", str(model_dir), "--task", "sst2", "--data", str(data_dir),
            "--output-dir", str(out), "--task.num_train", "32", "--task.num_dev", "8", "--task.num_test", "8",
            "--batch-size", "4", "--lr", "1e-2", "--eps", "1e-2", "--progress", "false", "--tensorboard", "false",
            "--zero_shot", "false", "--eval_every", "100", *extra]
    assert main(argv) == 0


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _same(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _steps(run) -> list[dict]:
    lines = [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "time"} for line in lines if "step" in line and "event" not in line]


ALGORITHM_ARGS = {
    "fzoo": ["--optim.algorithm", "fzoo", "--optim.fzoo.probes", "3", "--optim.perturbation", "rademacher-shared"],
    "momentum": ["--optim.algorithm", "momentum", "--optim.momentum.history", "3", "--optim.directions", "2",
                 "--optim.perturbation", "rademacher-packed"],
    "momentum-adam": ["--optim.algorithm", "momentum", "--optim.momentum.history", "3", "--optim.directions", "2",
                      "--optim.momentum.rule", "adam"],
    "sparse": ["--optim.algorithm", "sparse", "--optim.sparse.sparsity", "0.5", "--optim.directions", "2"],
    # (no eps schedule: its horizon is `steps`, which the resumed runs below extend)
    "mezo-adaptive": ["--optim.eps_band_low", "1e-4", "--optim.eps_band_high", "1e-3", "--optim.mezo.transform",
                      "clip"],
}


@pytest.mark.parametrize("name", list(ALGORITHM_ARGS))
def test_train_resume_and_replay_rebuild_every_step(name, tiny_model_dir, sst2_dir, tmp_path):
    args = ALGORITHM_ARGS[name]
    whole = tmp_path / "whole"
    _train(tiny_model_dir, sst2_dir, whole, "--steps", "6", *args)
    header = json.loads((whole / "trajectory.jsonl").read_text().splitlines()[0])["header"]
    assert header["algorithm"] == name.split("-")[0] and header["algorithm_settings"]
    # resumed from a checkpoint, and from the log alone (its checkpoints deleted)
    for kind in ("checkpoint", "log"):
        part = tmp_path / kind
        _train(tiny_model_dir, sst2_dir, part, "--steps", "3", *args)
        if kind == "log":
            shutil.rmtree(part / "checkpoints")
        assert main(["train", "--resume", "--output-dir", str(part), "--steps", "6"]) == 0
        assert _steps(part) == _steps(whole)
        assert _same(part / "checkpoints" / "last", whole / "checkpoints" / "last")
    rebuilt = tmp_path / "rebuilt"
    assert main(["replay", str(tiny_model_dir), str(whole / "trajectory.jsonl"), "--output", str(rebuilt)]) == 0
    assert _same(rebuilt, whole / "checkpoints" / "last")


def test_a_resume_refuses_a_log_of_another_seed_layout(tiny_model_dir, sst2_dir, tmp_path, monkeypatch, capsys):
    """A run whose log measured other directions than this distzo lays out for its steps (a log
    written by a distzo that laid its seeds out otherwise) is refused in one line, its files
    untouched: its momentum would pair the logged g's with directions it would not regenerate."""
    from distzo import directions

    run = tmp_path / "run"
    _train(tiny_model_dir, sst2_dir, run, "--steps", "3", "--optim.algorithm", "momentum",
           "--optim.momentum.history", "3", "--optim.perturbation", "rademacher-shared")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    layout = directions.step_seed
    monkeypatch.setattr(directions, "step_seed", lambda run_seed, step, d, kind="gaussian", per_step=1:
                        layout(run_seed + 1, step, d, kind, per_step))
    capsys.readouterr()
    assert main(["train", "--resume", "--output-dir", str(run), "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 2 of the run's log measured other directions" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(directions, "step_seed", layout)  # the layout that wrote it continues it
    assert main(["train", "--resume", "--output-dir", str(run), "--steps", "6"]) == 0
