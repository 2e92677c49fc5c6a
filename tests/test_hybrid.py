"""Hybrid training: optim.first_order parameters by backprop, the rest by ZO (distzo.first_order).

The oracle is a plain float64 loop: MeZO's four passes with the ZO parameters perturbed in place,
autograd on for the FO parameters through the two perturbed forwards, their mean's gradient, and
``torch.optim.AdamW``."""

from __future__ import annotations

import copy
import fnmatch
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_batch, tiny_model

from distzo.algorithms.fzoo import FZOO
from distzo.cli import main
from distzo.directions import direction_like, stable_key, step_seed
from distzo.first_order import TENSORS_FILE, FirstOrder, match
from distzo.offload import OffloadConfig, OffloadEngine
from distzo.optimizer import ZOOptimizer, causal_lm_loss

LR, EPS, WD, FO_LR, STEPS = 1e-3, 1e-3, 0.1, 1e-2, 12


def _loss(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return causal_lm_loss(out, batch)


def reference_step(model, adamw, fo_names, batch, step):
    """One hybrid step, written out: returns (L+, L-)."""
    zo = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n not in fo_names]
    seed = step_seed(0, step, 0)
    z = {n: direction_like(p, seed, stable_key(n)).to(p.dtype) for n, p in zo}  # float32 as drawn

    def shift(scale):
        with torch.no_grad():
            for n, p in zo:
                p.add_(z[n], alpha=scale)

    def measured():
        # the ZO parameters take no part in autograd; each backward comes before they move again
        for _, p in zo:
            p.requires_grad_(False)
        loss = _loss(model, batch)
        (loss / 2).backward()
        for _, p in zo:
            p.requires_grad_(True)
        return float(loss.detach())

    shift(EPS)
    plus = measured()
    shift(-2 * EPS)
    minus = measured()
    shift(EPS)
    adamw.step()
    adamw.zero_grad()
    g = (plus - minus) / (2 * EPS)
    with torch.no_grad():
        for n, p in zo:
            decay = WD * p if p.ndim >= 2 else 0.0
            p.copy_(p - LR * (g * z[n] + decay))
    return plus, minus


def _fo_names(model, patterns):
    return {n for n, p in model.named_parameters()
            if p.requires_grad and any(fnmatch.fnmatchcase(n, x) for x in patterns)}


def _max_diff(a, b) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("patterns,batch_streams", [(["model.norm.weight"], False), (["model.layers.1.*"], False),
                                                    (["model.layers.1.mlp.*", "model.norm.*"], False),
                                                    (["model.layers.1.mlp.*", "model.norm.*"], True)])
def test_hybrid_matches_the_reference(patterns, batch_streams):
    # batch_streams: the FO layers inside a block then run once over both streams' rows, the
    # ZO ones stream by stream; the backward sums the streams' gradients as before
    model = tiny_model("llama", dtype=torch.float64)
    ref = copy.deepcopy(model)
    model.train()  # the optimiser measures in eval mode whatever the model's mode
    fo = FirstOrder.select(model, patterns, lr=FO_LR)
    opt = ZOOptimizer(model, lr=LR, eps=EPS, weight_decay=WD, first_order=fo, batch_streams=batch_streams)
    assert bool(opt._stream.batched) == batch_streams
    names = _fo_names(ref, patterns)
    adamw = torch.optim.AdamW([p for n, p in ref.named_parameters() if n in names], lr=FO_LR, weight_decay=0.0)
    start = {n: p.detach().clone() for n, p in ref.named_parameters() if n in names}
    for t in range(STEPS):
        batch = tiny_batch(seed=t)
        stats = opt.step(batch)
        plus, minus = reference_step(ref, adamw, names, batch, t)
        assert stats.losses == [[pytest.approx(plus, abs=1e-12), pytest.approx(minus, abs=1e-12)]]
    opt.flush()
    assert _max_diff(model, ref) < 1e-11
    moved = [n for n, p in ref.named_parameters() if n in names and not torch.equal(p, start[n])]
    assert sorted(moved) == sorted(names)  # AdamW moved every FO tensor
    assert {p.name for p in opt.params}.isdisjoint(names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("patterns,algorithm", [(["model.norm.weight"], None), (["model.layers.1.*"], None),
                                                (["model.norm.weight"], "fzoo")])
def test_zo_losses_equal_a_frozen_run_at_step_0(dtype, patterns, algorithm):
    hybrid_model = tiny_model("llama", dtype=dtype)
    frozen_model = copy.deepcopy(hybrid_model)
    for n in _fo_names(frozen_model, patterns):
        frozen_model.get_parameter(n).requires_grad_(False)

    def build(model, fo):
        algo = FZOO(lr=LR, eps=EPS, probes=3) if algorithm else "mezo"
        return ZOOptimizer(model, lr=LR, eps=EPS, algorithm=algo, first_order=fo)

    hybrid = build(hybrid_model, FirstOrder.select(hybrid_model, patterns))
    frozen = build(frozen_model, None)
    a, b = hybrid.step(tiny_batch(seed=0)), frozen.step(tiny_batch(seed=0))
    assert a.losses == b.losses and a.update == b.update  # bit for bit
    assert [p.name for p in hybrid.params] == [p.name for p in frozen.params]


def test_no_zo_weight_joins_the_graph():
    # one-sided MeZO measures theta itself: a probe of scale 0 reads the ZO weights unperturbed
    model = tiny_model("llama", dtype=torch.float64)
    opt = ZOOptimizer(model, lr=LR, estimator="one-sided", first_order=FirstOrder.select(model, ["model.layers.1.*"]))
    opt.step(tiny_batch())
    assert all(p.param.grad is None for p in opt.params)


def test_extra_bytes_are_the_gradients_and_moments():
    model = tiny_model("llama", dtype=torch.float32)
    fo = FirstOrder.select(model, ["model.norm.weight", "model.layers.1.mlp.*"])
    assert fo.extra_bytes() == 12 * fo.numel()  # float32: gradient + two moments
    half = tiny_model("llama", dtype=torch.bfloat16)
    fo = FirstOrder.select(half, ["model.norm.weight"])
    assert fo.extra_bytes() == (2 + 8 + 8) * fo.numel()  # + a float32 master and its gradient


def test_bf16_parameters_step_through_a_float32_master():
    model = tiny_model("llama", dtype=torch.bfloat16)
    fo = FirstOrder.select(model, ["model.norm.weight"], lr=1e-4)
    opt = ZOOptimizer(model, lr=0.0, first_order=fo)
    for t in range(3):
        opt.step(tiny_batch(seed=t))
    (master,) = fo.masters
    assert master.dtype == torch.float32 and not torch.equal(master, torch.ones_like(master))
    assert torch.equal(model.model.norm.weight, master.to(torch.bfloat16))


@pytest.mark.parametrize("patterns,why", [(["nothing.*"], "matches no trainable parameter"),
                                          (["model.norm.weight", "typo.*"], "'typo.*' matches no"),
                                          (["*"], "matches every trainable parameter")])
def test_bad_patterns_are_refused(patterns, why):
    with pytest.raises(ValueError, match=why):
        match(tiny_model("llama"), patterns)


def test_offload_allows_only_resident_parameters_after_the_blocks():
    model = tiny_model("llama")
    engine = OffloadEngine(model, "cpu", OffloadConfig("cpu"))
    for patterns, why in ((["model.layers.1.*"], "offloaded block"), (["model.embed_tokens.*"], "before the")):
        with pytest.raises(ValueError, match=why):
            ZOOptimizer(model, first_order=FirstOrder.select(model, patterns), offload=engine)
    # the final norm is resident and after the blocks: offloaded equals resident
    resident = tiny_model("llama")
    a = ZOOptimizer(resident, lr=LR, first_order=FirstOrder.select(resident, ["model.norm.weight"]))
    b = ZOOptimizer(model, lr=LR, first_order=FirstOrder.select(model, ["model.norm.weight"]), offload=engine)
    for t in range(3):
        x, y = a.step(tiny_batch(seed=t)), b.step(tiny_batch(seed=t))
        assert (x.losses, x.update) == (y.losses, y.update)
    a.flush()
    b.flush()
    assert all(torch.equal(x, y) for x, y in zip(resident.state_dict().values(), model.state_dict().values()))


def test_torchrun_is_refused():
    class TwoRanks:  # what the optimiser asks of a mesh
        distributed = True

        def size(self, axis):
            return 2 if axis == "data" else 1

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="does not work under torchrun"):
        ZOOptimizer(model, first_order=FirstOrder.select(model, ["model.norm.weight"]), mesh=TwoRanks())


# --------------------------------------------------------------------------- the entry point

FO_ARGS = ["--optim.first_order", "model.norm.weight,model.layers.1.mlp.*", "--optim.first_order_lr", "1e-2"]


def _train(model_dir, data_dir, out, *extra) -> int:
    argv = ["train", "--lora", "false", "--model", str(model_dir), "--task", "sst2", "--data", str(data_dir),
            "--output-dir", str(out), "--task.num_train", "32", "--task.num_dev", "8", "--task.num_test", "8",
            "--batch-size", "4", "--lr", "1e-2", "--eps", "1e-2", "--progress", "false", "--tensorboard", "false",
            "--zero_shot", "false", "--eval_every", "100", *extra]
    return main(argv)


def _steps(run) -> list[dict]:
    lines = [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "time"} for line in lines if "step" in line and "event" not in line]


def _same_weights(a, b) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_resume_and_replay(tiny_model_dir, sst2_dir, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert _train(tiny_model_dir, sst2_dir, whole, "--steps", "6", *FO_ARGS) == 0
    header = json.loads((whole / "trajectory.jsonl").read_text().splitlines()[0])["header"]
    assert header["extra"]["first_order"]["patterns"] == ["model.norm.weight", "model.layers.1.mlp.*"]
    last = whole / "checkpoints" / "last"
    state = json.loads((last / "optimizer.json").read_text())
    assert state["first_order"]["names"][0] == "model.layers.1.mlp.gate_proj.weight"
    assert "model.norm.weight/exp_avg" in load_file(last / TENSORS_FILE)

    part = tmp_path / "part"
    assert _train(tiny_model_dir, sst2_dir, part, "--steps", "3", *FO_ARGS) == 0
    assert main(["train", "--resume", "--output-dir", str(part), "--steps", "6"]) == 0
    assert _steps(part) == _steps(whole)  # the ZO losses depend on the FO weights: step for step
    assert _same_weights(part / "checkpoints" / "last", last)
    want, got = load_file(last / TENSORS_FILE), load_file(part / "checkpoints" / "last" / TENSORS_FILE)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # the patterns are part of how the run updates its weights: a resume may not change them
    capsys.readouterr()
    assert main(["train", "--resume", "--output-dir", str(part), "--optim.first_order", "model.norm.weight"]) == 2
    assert "optim.first_order" in capsys.readouterr().err

    # the log holds only the ZO updates: replay, and resume from the log alone, refuse in one line
    rebuilt = tmp_path / "rebuilt"
    assert main(["replay", str(tiny_model_dir), str(whole / "trajectory.jsonl"), "--output", str(rebuilt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "first_order" in err and not rebuilt.exists()
    shutil.rmtree(part / "checkpoints")
    before = sorted(p.name for p in part.iterdir())
    assert main(["train", "--resume", "--output-dir", str(part), "--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trajectory log alone" in err
    assert sorted(p.name for p in part.iterdir()) == before


@pytest.mark.parametrize("patterns,why", [("lm_head.*", "matches no trainable parameter"),
                                          ("*", "matches every trainable parameter")])
def test_train_refuses_bad_patterns(tiny_model_dir, sst2_dir, tmp_path, capsys, patterns, why):
    out = tmp_path / "run"
    assert _train(tiny_model_dir, sst2_dir, out, "--steps", "2", "--optim.first_order", patterns) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err
    assert not out.exists() or not any(p.name != ".distzo.lock" for p in out.iterdir())
