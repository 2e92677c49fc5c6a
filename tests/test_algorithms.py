"""Algorithms as plans of probes: MeZO's plan and update, and how runs name the algorithm."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

from distzo import algorithms, directions
from distzo.algorithms import Finished, Forward, Probe
from distzo.algorithms.mezo import MeZO
from distzo.checkpoint import TrajectoryHeader, TrajectoryLog
from distzo.cli import parser
from distzo.optimizer import ZOOptimizer
from distzo.records import zo_sgd
from distzo.schedules import Schedule


@pytest.mark.parametrize("estimator,second", [("two-sided", -1e-2), ("one-sided", 0.0)])
def test_mezo_plans_q_forwards_of_two_probes_along_the_step_seeds(estimator, second):
    algo = MeZO(eps=1e-2, directions=3, estimator=estimator, seed=5)
    plan = algo.plan(7)
    seeds = [directions.step_seed(5, 7, j) for j in range(3)]
    assert plan == [Forward((Probe(s, 1e-2), Probe(s, second))) for s in seeds]


def test_an_algorithm_takes_the_optimisers_kind_of_directions():
    """rademacher-shared lays a run's seeds out as families of 32 lanes; an algorithm built without a
    kind takes the optimiser's, one built for another kind is refused where the layouts differ."""
    from distzo.algorithms.fzoo import FZOO
    from distzo.algorithms.momentum import Momentum

    model = tiny_model("llama")
    for algo, count in ((FZOO(probes=4, seed=5), 4), (Momentum(history=2, directions=2, seed=5), 2)):
        opt = ZOOptimizer(model, perturbation="rademacher-shared", algorithm=algo)
        seeds = list(dict.fromkeys(p.seed for f in opt.algorithm.plan(3) for p in f.probes if p.scale))
        assert algo.perturbation == "rademacher-shared"
        assert seeds == directions.step_seeds(5, 3, count, "rademacher-shared")
        assert len({directions.family(s) for s in seeds}) == 1
    with pytest.raises(ValueError, match="lays out its seeds for rademacher directions"):
        ZOOptimizer(model, perturbation="rademacher-shared", algorithm=FZOO(perturbation="rademacher"))
    plain = FZOO(perturbation="gaussian")
    ZOOptimizer(model, perturbation="rademacher", algorithm=plain)  # the same seeds for both: accepted
    assert plain.seeds(2) == FZOO().seeds(2)


def test_a_shared_momentum_window_spans_at_most_two_families():
    """Momentum's record holds the seeds of its last h steps: with rademacher-shared they are
    consecutive lanes, one family (two where the window crosses a family's end), which the fused
    pass draws once each, where any other layout has h."""
    from distzo.algorithms.momentum import Momentum

    algo = Momentum(history=8, seed=5, perturbation="rademacher-shared")
    spans = []
    for t in range(40):
        record = algo.finish(t, [[1.0, 0.5]]).update
        assert record.seeds == tuple(s for a in range(min(t + 1, 8)) for s in algo.mezo.seeds(t - a))
        spans.append(len({directions.family(s) for s in record.seeds}))
    assert spans == [1] * 32 + [2] * 7 + [1]


def test_mezo_finishes_with_the_zo_sgd_record():
    algo = MeZO(lr=1e-3, eps=1e-2, weight_decay=0.1, directions=2, seed=5,
                schedule=Schedule("linear", total_steps=10))
    done = algo.finish(4, [[2.0, 1.5], [1.0, 1.25]])
    grads = [(2.0 - 1.5) / 2e-2, (1.0 - 1.25) / 2e-2]
    assert done.projected_grads == grads and done.loss == (2.0 + 1.5 + 1.0 + 1.25) / 4 and done.finite
    assert done.update == zo_sgd(4, algo.seeds(4), grads, 1e-3 * Schedule("linear", total_steps=10).factor(4), 0.1)
    assert done.update.divisor == 2
    assert not algo.finish(4, [[float("nan"), 1.0], [1.0, 1.0]]).finite


def test_a_forward_holds_probes_of_any_seeds():
    forward = Forward((Probe(1, 1e-3), Probe(2, -1e-3), Probe(1, 0.0)))
    assert forward.seeds == (1, 2)
    with pytest.raises(ValueError, match="at least one probe"):
        Forward(())


def test_the_optimiser_runs_mezo_by_default_and_by_name():
    a, b = tiny_model("llama"), tiny_model("llama")
    by_default = ZOOptimizer(a, lr=1e-3, eps=1e-3, directions=2)
    by_name = ZOOptimizer(b, lr=1e-3, eps=1e-3, directions=2, algorithm="mezo")
    built = ZOOptimizer(tiny_model("llama"), algorithm=MeZO(lr=1e-3, eps=1e-3, directions=2))
    stats = [opt.step(tiny_batch(seed=0)) for opt in (by_default, by_name, built)]
    assert stats[0] == stats[1] == stats[2]
    assert by_name.state_dict()["algorithm"] == "mezo"
    with pytest.raises(ValueError, match="unknown algorithm"):
        ZOOptimizer(tiny_model("llama"), algorithm="adam")


def test_a_state_without_an_algorithm_name_is_mezos():
    opt = ZOOptimizer(tiny_model("llama"), lr=1e-3)
    opt.step(tiny_batch(seed=0))
    state = opt.state_dict()
    del state["algorithm"]
    state["pending"] = {"step": 0, "seeds": [str(s) for s in opt.pending.seeds], "grads": list(opt.pending.coeffs),
                        "lr": opt.pending.lr}  # how checkpoints held it before update records
    other = ZOOptimizer(tiny_model("llama"), lr=5.0)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.pending == opt.pending and other.state_dict() == opt.state_dict()


def test_the_header_records_the_algorithm_and_old_headers_read_as_mezo(tmp_path):
    header = TrajectoryHeader(model="tiny")
    assert header.algorithm == "mezo"
    line = {k: v for k, v in header.__dict__.items() if k != "algorithm"}
    assert TrajectoryHeader.from_dict(line) == header
    with pytest.raises(ValueError, match="unknown algorithm"):
        TrajectoryHeader(model="tiny", algorithm="adam")
    log = TrajectoryLog(tmp_path / "t.jsonl")
    log.start(header)
    log.close()
    assert json.loads((tmp_path / "t.jsonl").read_text())["header"]["algorithm"] == "mezo"


def test_the_algorithm_is_a_training_setting(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--help"])
    assert "--optim.algorithm" in capsys.readouterr().out
    assert algorithms.names() == ("mezo", "fzoo", "momentum", "sparse")


def test_engines_never_see_the_algorithm():
    # the optimiser's plan-running path is the same for any algorithm with two probes a forward
    class Doubled(MeZO):
        name = "doubled"

        def finish(self, step, losses):
            done = super().finish(step, losses)
            return done.__class__(done.update, done.loss * 2, done.projected_grads, done.finite)

    opt = ZOOptimizer(tiny_model("llama"), algorithm=Doubled(lr=1e-3))
    ref = ZOOptimizer(tiny_model("llama"), lr=1e-3)
    a, b = opt.step(tiny_batch(seed=0)), ref.step(tiny_batch(seed=0))
    assert a.loss == 2 * b.loss and a.update == b.update
    opt.flush()
    ref.flush()
    assert all(torch.equal(x, y) for x, y in zip(opt.model.parameters(), ref.model.parameters()))


@pytest.mark.parametrize("merge", [False, True])
def test_a_plan_of_any_shape_is_measured_probe_by_probe(merge):
    # forwards of one, three and mixed-seed probes: each loss is that probe's own loss
    plan = [Forward((Probe(11, 1e-3), Probe(11, 0.0), Probe(11, -1e-3))), Forward((Probe(12, 2e-3),)),
            Forward((Probe(13, 1e-3), Probe(14, -1e-3)))]

    class Shaped(MeZO):
        name = "shaped"

        def plan(self, step):
            return plan

        def finish(self, step, losses):
            self.seen = losses
            return Finished(zo_sgd(step, [11], [1.0], 0.0, 0.0), losses[0][1], [1.0], True)

    model = tiny_model("llama", dtype=torch.float64)
    algo = Shaped(lr=0.0)
    opt = ZOOptimizer(model, algorithm=algo, merge_forwards=merge)
    batch = tiny_batch(seed=0)
    opt.step(batch)
    alone = [[opt.stream_losses(batch, (probe,))[0] for probe in f.probes] for f in plan]
    assert [len(row) for row in algo.seen] == [3, 1, 2]
    assert algo.seen == [pytest.approx(row, abs=1e-12) for row in alone]
