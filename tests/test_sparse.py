"""Sparse MeZO against its float64 reference, on the offload engine, and through
``distzo train``, ``--resume`` and ``distzo replay``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from reference_sparse import SparseReference, sorted_threshold
from test_algorithm_runs import _losses_match, _max_diff, _same, _steps, _train
from tiny_models import tiny_batch, tiny_model

from distzo import directions, update
from distzo.algorithms.sparse import SparseConfig, SparseMeZO, threshold
from distzo.config import OptimConfig, TrainConfig
from distzo.offload import OffloadConfig, OffloadEngine
from distzo.optimizer import ZOOptimizer, causal_lm_loss
from distzo.records import MASK_FIELD, zo_sgd

LR, EPS, WD, STEPS = 1e-3, 1e-3, 0.1, 20
KEY = directions.stable_key("model.layers.0.mlp.up_proj.weight")


def _sparse(sparsity=0.75, **settings) -> SparseMeZO:
    return SparseMeZO(sparsity, **{"lr": LR, "eps": EPS, "weight_decay": WD, **settings})


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_threshold_is_the_sorted_magnitude(sparsity, dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(37, 53, generator=g) * 0.05).to(dtype)  # bf16 has ties
    h = threshold(w, sparsity)
    assert h == sorted_threshold(w, sparsity)
    tuned = float((w.float().abs() <= h).float().mean())
    assert tuned >= 1 - sparsity - 1e-12 and (dtype == torch.bfloat16 or tuned <= 1 - sparsity + 1 / w.numel())


@pytest.mark.parametrize("family,q", [("llama", 1), ("opt", 2)])
def test_sparse_matches_its_reference(family, q):
    model = tiny_model(family, dtype=torch.float64)
    ref = SparseReference(copy.deepcopy(model), lr=LR, eps=EPS, sparsity=0.75, q=q, weight_decay=WD)
    opt = ZOOptimizer(model, algorithm=_sparse(directions=q))
    for t in range(STEPS):
        batch = tiny_batch(seed=t)
        stats = opt.step(batch)
        _losses_match(stats.losses, ref.step(batch, t, causal_lm_loss))
        assert (MASK_FIELD in stats.log) == (t == 0)
    opt.flush()
    assert opt.algorithm.masks == ref.h  # every matrix, no 1-D tensor
    assert _max_diff(model, ref.model) < 1e-12


def test_only_the_small_weights_move_and_the_mask_follows_them():
    model = tiny_model("llama")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = ZOOptimizer(model, algorithm=_sparse(0.5, lr=1e-2))
    opt.step(tiny_batch(seed=0))
    opt.flush()
    masks = opt.algorithm.masks
    for n, p in model.named_parameters():
        moved = p.detach() != start[n]
        if p.ndim < 2:
            assert n not in masks and float(moved.float().mean()) > 0.9
            continue
        live = start[n].abs() <= masks[n]
        assert not torch.any(moved & ~live)  # a large weight keeps its bits
        assert float(moved.float().sum()) > 0.9 * float(live.float().sum())
    # a weight pushed past its threshold stops moving: the mask is the weights', step by step
    name = next(n for n in masks if "mlp" in n)
    p = dict(model.named_parameters())[name]
    with torch.no_grad():
        p.fill_(2 * masks[name])
    opt.step(tiny_batch(seed=1))
    opt.flush()
    assert torch.all(p == 2 * masks[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_mask_of_every_element_changes_no_bit(dtype):
    # the masked arithmetic is the unmasked one plus a select: same bits where the mask holds
    start = (torch.randn(33, 65, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    record = zo_sgd(0, [7, 8], [37.5, -12.25], 1e-3, 0.1)
    z = directions.direction_like(start, 9, KEY)
    for h in (math.inf, float(start.float().abs().max())):
        plain, masked = start.clone(), start.clone()
        update.apply_update_(plain, KEY, record)
        update.apply_update_(masked, KEY, record, threshold=h)
        assert torch.equal(plain, masked) and not torch.equal(plain, start)
        assert torch.equal(update.perturbed(plain, z, 1e-3), update.perturbed(plain, z, 1e-3, threshold=math.inf))
    # and none: theta keeps its bits
    frozen = start.clone()
    update.apply_update_(frozen, KEY, record, threshold=-1.0)
    assert torch.equal(frozen, start) and torch.equal(update.perturbed(start, z, 1e-3, threshold=-1.0), start)


def test_sparsity_zero_is_mezo_bit_for_bit():
    a, b = tiny_model("llama"), tiny_model("llama")
    sparse = ZOOptimizer(a, algorithm=_sparse(0.0, directions=2))
    plain = ZOOptimizer(b, lr=LR, eps=EPS, weight_decay=WD, directions=2)
    for t in range(4):
        x, y = sparse.step(tiny_batch(seed=t)), plain.step(tiny_batch(seed=t))
        assert (x.losses, x.update) == (y.losses, y.update)
    sparse.flush()
    plain.flush()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("write_every", [1, 3])
def test_offloaded_equals_resident_bit_for_bit(write_every):
    resident = tiny_model("llama")
    offloaded = copy.deepcopy(resident)
    engine = OffloadEngine(offloaded, "cpu", OffloadConfig("cpu", write_every=write_every))
    a = ZOOptimizer(resident, algorithm=_sparse(directions=2))
    b = ZOOptimizer(offloaded, algorithm=_sparse(directions=2), offload=engine)
    for t in range(6):
        x, y = a.step(tiny_batch(seed=t)), b.step(tiny_batch(seed=t))
        assert (x.losses, x.update, x.log) == (y.losses, y.update, y.log)
    a.flush()
    b.flush()
    assert all(torch.equal(x, y) for x, y in zip(resident.state_dict().values(), offloaded.state_dict().values()))


def test_state_and_log_restore_the_thresholds():
    model = tiny_model("llama")
    opt = ZOOptimizer(model, algorithm=_sparse())
    lines = [{"step": t, **opt.step(tiny_batch(seed=t)).log} for t in range(3)]
    state = json.loads(json.dumps(opt.state_dict()))  # as a checkpoint stores it
    from_state, from_log = _sparse(), _sparse()
    from_state.load_state_dict(state)
    from_log.restore(lines)
    assert from_state.masks == from_log.masks == opt.algorithm.masks
    # the weights have moved: a later step must not read thresholds from them again
    assert from_state.thresholds({}) == opt.algorithm.masks
    with pytest.raises(ValueError, match=MASK_FIELD):
        _sparse().restore([{"step": 0}])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="sparsity"):
        SparseConfig(1.0)
    assert OptimConfig(algorithm="sparse").sparse.sparsity == 0.75
    with pytest.raises(ValueError, match="LoRA"):
        TrainConfig(optim=OptimConfig(algorithm="sparse"), use_lora=True)


SPARSE_ARGS = ["--optim.algorithm", "sparse", "--optim.sparse.sparsity", "0.5", "--optim.directions", "2"]


def test_the_step_0_line_holds_the_thresholds(tiny_model_dir, sst2_dir, tmp_path):
    # (train, --resume and replay rebuild a sparse run: tests/test_algorithm_runs.py)
    _train(tiny_model_dir, sst2_dir, tmp_path / "run", "--steps", "3", *SPARSE_ARGS)
    header = json.loads((tmp_path / "run" / "trajectory.jsonl").read_text().splitlines()[0])["header"]
    assert header["algorithm"] == "sparse" and header["algorithm_settings"]["sparsity"] == 0.5
    steps = _steps(tmp_path / "run")
    assert MASK_FIELD in steps[0] and not any(MASK_FIELD in line for line in steps[1:])