"""The fused Triton kernels against the CPU reference (directions, update, optimizer).

Tolerances, and why:
- Philox words and uniforms: bit-exact (integer arithmetic, exact int -> float).
- Gaussian z: |z_gpu - z_cpu| <= 1e-5. Box-Muller runs on the special-function unit
  (lg2/sin/cos approximations, absolute error ~2^-21 on the argument's scale) with an exact
  series near u = 1; the CPU uses libm-quality float32 routines. Observed: a few 1e-6.
- fp32 update: <= 1e-6 of the tensor's scale (z's error times lr * g, far below).
- bf16/fp16 update: bit-equal except where the z error moves x across a rounding
  threshold; then one ulp. Expected rate ~ lr * |g| * dz / ulp (FLIP_RATE below).
- Full runs: fp32 on cuda vs the CPU MeZO reference as in test_optimizer (losses to 2e-5,
  g to 2e-2: float32 losses differ by a few ulp between devices, g divides by 2 eps).
  bf16: a bf16 forward rounds differently on another device, and g = dL / (2 eps)
  magnifies that, so the cuda run is compared with the torch path *on cuda* (same forward),
  and with the CPU run only on its losses.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference_mezo import mezo_step
from tiny_models import tiny_batch, tiny_model

from distzo import directions, update
from distzo.checkpoint import TrajectoryHeader, TrajectoryLog
from distzo.optimizer import ZOOptimizer, causal_lm_loss
from distzo.records import zo_sgd
from distzo.replay import replay_into

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KEY = directions.stable_key("model.layers.0.mlp.up_proj.weight")
BIG = (1 << 64) - 1
# Bound on the fraction of elements whose rounding differs from the CPU's (see the module
# docstring): here lr * |g| * |dz| ~ 1e-3 * 37.5 * 2e-6 against an ulp at |theta| ~ 0.05 of
# 2^-12 (bf16) or 2^-15 (fp16), i.e. ~3e-4 and ~2.5e-3 expected.
FLIP_RATE = {torch.bfloat16: 2e-3, torch.float16: 1e-2}


@pytest.fixture(scope="module")
def ops():
    from distzo import kernels

    found = kernels.fused_for(torch.empty(1, device="cuda"))
    assert found is not None, "CUDA is available but the Triton kernels did not import"
    return found


WORD_CASES = [  # (seed, key, start, count)
    (0, 0, 0, 16),
    (1, KEY, 3, 1),
    (12345, KEY, 5, 4099),
    (BIG, BIG, 0, 3),
    (2**63 + 7, 2**32 - 1, 2**32 * 4 - 6, 1000),  # block index crosses 2^32
    (directions.step_seed(0, 3, 1), KEY, 7, (1 << 20) + 3),
    (99, 2**40 + 1, 1 << 22, (1 << 21) + 1),
]


@pytest.mark.parametrize("seed,key,start,count", WORD_CASES)
def test_raw_words_and_uniforms_are_bit_exact(ops, seed, key, start, count):
    got = ops.raw_words(seed, key, start, count, device="cuda").cpu()
    assert got.dtype == torch.int64 and got.shape == (count,)
    assert torch.equal(got, directions.raw_words(seed, key, start, count))
    assert torch.equal(ops.uniform(seed, key, start, count, device="cuda").cpu(),
                       directions.uniform(seed, key, start, count))


@pytest.mark.parametrize("seed,key,start,count", WORD_CASES)
def test_normals_match_cpu(ops, seed, key, start, count):
    z = ops.normal(seed, key, start, count, "gaussian", device="cuda").cpu()
    ref = directions.draw(seed, key, start, count, "gaussian")
    assert float((z - ref).abs().max()) <= 1e-5
    for kind in ("rademacher", "rademacher-packed", "rademacher-shared"):
        r = ops.normal(seed, key, start, count, kind, device="cuda").cpu()
        assert torch.equal(r, directions.draw(seed, key, start, count, kind)), kind


def test_normals_are_standard_and_slices_agree(ops):
    n = 1 << 24
    z = ops.normal(7, KEY, 0, n, device="cuda").double()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.std()) - 1) < 5 / math.sqrt(n)
    assert torch.equal(ops.normal(7, KEY, 1001, 5000, device="cuda"), z[1001:6001].float())


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """16-bit float codes as integers in value order (so a difference counts ulps, across 0 too)."""
    code = t.view(torch.int16).to(torch.int32)
    return torch.where(code < 0, -(code & 0x7FFF), code)


def _param(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


UPDATE_CASES = [  # (q, weight decay, kind, shape)
    (1, 0.0, "gaussian", (257, 129)),
    (1, 0.1, "gaussian", (64, 1000)),
    (3, 0.1, "gaussian", (300, 77)),
    (2, 0.0, "rademacher", (4099,)),
    (3, 0.1, "rademacher-packed", (300, 77)),  # runs of 16 signs across rows and program ends
    (1, 0.0, "rademacher-packed", (4099,)),
    (1, 0.1, "gaussian", (4099,)),  # 1-D: no decay
    (3, 0.1, "rademacher-shared", (300, 77)),  # three lanes of one family
    (1, 0.0, "rademacher-shared", (4099,)),
]


def _update_args(q, kind="gaussian"):
    seeds = directions.step_seeds(5, 11, q, kind)
    grads = [37.5, -12.25, 3.0][:q]
    return seeds, grads


@pytest.mark.parametrize("q,wd,kind,shape", UPDATE_CASES)
def test_apply_update_fp32(ops, q, wd, kind, shape):
    seeds, grads = _update_args(q, kind)
    ref = _param(shape, torch.float32)
    got = ref.cuda()
    update.apply_update_(ref, KEY, zo_sgd(0, seeds, grads, 1e-3, wd), kind)
    ops.apply_update(got, KEY, zo_sgd(0, seeds, grads, 1e-3, wd), kind)
    err = float((got.cpu() - ref).abs().max())
    assert err <= 1e-6 * float(ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q,wd,kind,shape", UPDATE_CASES)
def test_apply_update_half_precision(ops, dtype, q, wd, kind, shape):
    seeds, grads = _update_args(q, kind)
    start = _param(shape, dtype)
    ref = start.clone()
    got = start.cuda()
    update.apply_update_(ref, KEY, zo_sgd(0, seeds, grads, 1e-3, wd), kind)
    ops.apply_update(got, KEY, zo_sgd(0, seeds, grads, 1e-3, wd), kind)
    got = got.cpu()
    assert float((got != start).float().mean()) > 0.5  # the update did something
    differ = got != ref
    assert float(differ.float().mean()) <= FLIP_RATE[dtype]
    # Where they differ, mostly by one ulp. Two when x lies within z's error of a
    # representable value: the two sides then see x on opposite sides of it and round
    # toward opposite neighbours (rate ~ (dx / ulp)^2, a few per 1e5 in fp16 here).
    codes = (_ordered(got) - _ordered(ref)).abs()[differ]
    assert torch.all(codes <= 2) and float((codes == 2).float().sum()) <= 1e-4 * got.numel() + 3


def _adam_record(kind_groups: int = 3, per_group: int = 2, wd: float = 0.1):
    from distzo.algorithms.momentum import weights
    from distzo.records import UpdateRecord

    seeds = [directions.step_seed(5, 11 + g, j) for g in range(kind_groups) for j in range(per_group)]
    coeffs = [37.5, -12.25, 3.0, 8.0, -20.0, 1.5][: len(seeds)]
    w1, w2 = weights(0.9, kind_groups), weights(0.99, kind_groups)
    return UpdateRecord(0, tuple(seeds), tuple(coeffs), 1e-3, divisor=1, decay=wd, rounding_seed=99,
                        adam=tuple((per_group, a, b) for a, b in zip(w1, w2)), delta=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", directions.KINDS)
def test_adam_update_in_the_fused_pass_matches_torch_path(ops, dtype, kind):
    # momentum's adam rule: m / (sqrt(v) + delta) from regenerated directions, in registers, against
    # the torch arithmetic on the same z (the kernels' own draws: m / sqrt(v) divides z's error by
    # the group estimates, which can nearly cancel; the arithmetic is what is checked here)
    record = _adam_record()
    assert not ops.torch_path(torch.empty(1, device="cuda"), record)
    start = _param((300, 77), dtype)
    ref, got = start.clone(), start.cuda()
    drawn = [ops.normal(s, KEY, 0, start.numel(), kind).view(start.shape).cpu() for s in record.seeds]
    update.apply_update_(ref, KEY, record, kind, cached=drawn)
    ops.apply_update(got, KEY, record, kind)
    got = got.cpu()
    if dtype == torch.float32:  # every element moves by about lr: z's error scales that, not theta
        assert float((got - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
        assert float((got - start).abs().min()) > 0
        return
    assert float((got != start).float().mean()) > 0.5
    differ = got != ref
    assert float(differ.float().mean()) <= FLIP_RATE[dtype]
    assert torch.all((_ordered(got) - _ordered(ref)).abs()[differ] <= 2)


def test_bf16_update_is_unbiased(ops):
    # lr g z ~ 2e-5, a tenth of a bf16 ulp at 0.05: rounding to nearest would lose it all
    n = 1 << 22
    w = torch.full((n,), 0.05, dtype=torch.bfloat16, device="cuda")
    seeds, grads, lr = [123], [2.0], 1e-5
    exact = w.float() - lr * grads[0] * ops.normal(seeds[0], KEY, 0, n, device="cuda")
    ops.apply_update(w, KEY, zo_sgd(0, seeds, grads, lr, 0.0))
    ulp = 2.0**-12
    err = w.float() - exact
    assert float(err.abs().max()) <= ulp
    assert abs(float(err.double().mean())) < 5 * (ulp / 2) / math.sqrt(n)
    assert float((w != 0.05).float().mean()) > 0.05  # moved, unlike round-to-nearest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_update", [False, True])
def test_update_and_shadows_match_torch_path(ops, dtype, with_update):
    shape, eps, seed = (513, 200), 1e-3, directions.step_seed(5, 12, 0)
    seeds, grads = _update_args(1)
    start = _param(shape, dtype, seed=1)
    ref = start.clone()
    if with_update:
        update.apply_update_(ref, KEY, zo_sgd(0, seeds, grads, 1e-3, 0.1), "gaussian")
    z = directions.direction_like(ref, seed, KEY)
    want = [(ref.float() + s * z).to(dtype) if dtype != torch.float32 else ref.add(z, alpha=s) for s in (eps, -eps)]
    got = start.cuda()
    pending = zo_sgd(0, seeds, grads, 1e-3, 0.1) if with_update else None
    plus, minus = ops.update_and_shadows(got, KEY, pending, "gaussian", seed, (eps, -eps))
    if not with_update:
        assert torch.equal(got.cpu(), start)  # evaluation never writes theta
    for sh, w in zip((plus, minus), want):
        sh = sh.cpu()
        assert sh.shape == shape and sh.dtype == dtype
        if dtype == torch.float32:
            assert float((sh - w).abs().max()) <= 1e-6 * float(w.abs().max())
        else:
            assert float((sh != w).float().mean()) <= FLIP_RATE[dtype]
            assert float((sh.float() - w.float()).abs().max()) <= 2.0**-7 * float(w.float().abs().max())
    # one-sided: a zero scale hands back the parameter itself
    plus2, same = ops.update_and_shadows(got, KEY, None, "gaussian", seed, (eps, 0.0))
    assert same is got and torch.equal(plus2, plus)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,same_family", [("rademacher-packed", False), ("rademacher-shared", False),
                                              ("rademacher-shared", True)])
def test_sign_kinds_in_the_fused_pass(ops, dtype, kind, same_family):
    """rademacher-packed z inside the step kernel (16-bit runs of one word per thread, program
    starts at multiples of 128), and rademacher-shared z whether the shadow's family is the update's
    (its words carried from the update to the shadows) or not: theta' is the CPU's update (to its
    rounding) and the shadows are exactly theta' + s z of the CPU's z."""
    seeds, grads = _update_args(2, kind)  # shared: lanes 22, 23 of family 0
    seed = directions.step_seeds(5, 12, 2, kind)[0] if same_family else directions.step_seed(5, 40, 0)
    assert (directions.family(seed) == directions.family(seeds[-1])) is same_family
    start = _param((300, 77), dtype, seed=2)
    got, want = start.cuda(), start.clone()
    pending = zo_sgd(0, seeds, grads, 1e-3, 0.1)
    plus, minus = ops.update_and_shadows(got, KEY, pending, kind, seed, (1e-3, -1e-3))
    update.apply_update_(want, KEY, pending, kind)
    theta = got.cpu()
    if dtype == torch.float32:
        assert float((theta - want).abs().max()) <= 1e-6 * float(start.abs().max())
    else:
        assert float((theta != start).float().mean()) > 0.5 and float((theta != want).float().mean()) <= FLIP_RATE[dtype]
    z = directions.direction_like(theta, seed, KEY, kind)
    assert torch.equal(plus.cpu(), update.perturbed(theta, z, 1e-3))
    assert torch.equal(minus.cpu(), update.perturbed(theta, z, -1e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,families", [("gaussian", 5), ("rademacher-packed", 5), ("rademacher-shared", 1),
                                           ("rademacher-shared", 3)])
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("shape", [(300, 77), (64, 512)])  # a length that is not a multiple of 16, and one that is
def test_shadows_of_many_seeds_in_one_pass_equal_one_pass_per_seed(ops, dtype, kind, families, two_sided, shape):
    """One launch writing N seeds' shadows (FZOO's probes, ZO-SGD's directions in one forward) gives
    the bits of N launches of one seed, the update applied once; a masked pass too. rademacher-shared:
    the seeds (and the update's) one family's lanes, whose words the pass draws once, or seeds that
    change family and come back to one (the words drawn again)."""
    if families == 3:
        one, two, three = (directions.step_seed(5, 12 + f, 0, kind, per_step=32) for f in range(3))
        seeds, update = (one, two + 1, one + 2, three + 3, three + 4), _update_args(2)
    else:  # rademacher-shared: the update's two seeds and the five probes' lanes of one family
        lanes = directions.step_seeds(5, 16, 7, kind)
        seeds, update = tuple(lanes[2:]), (lanes[:2], [37.5, -12.25])
    assert len({directions.family(s) for s in seeds}) == families
    pairs = tuple((1e-3 * (j + 1), -1e-3 if two_sided else 0.0) for j in range(len(seeds)))
    pending = zo_sgd(0, *update, 1e-3, 0.1)
    start = _param(shape, dtype, seed=3).cuda()
    for threshold in (None, 0.02):
        many, one = start.clone(), start.clone()
        got = ops.update_and_shadows_of(many, KEY, pending, kind, seeds, pairs, threshold)
        want = [ops.update_and_shadows(one, KEY, pending if j == 0 else None, kind, s, pair, threshold)
                for j, (s, pair) in enumerate(zip(seeds, pairs))]
        assert torch.equal(many, one)
        for (gp, gm), (wp, wm) in zip(got, want):
            assert torch.equal(gp, wp) and torch.equal(gm, wm)
            assert (gm is many) is (not two_sided)
    with pytest.raises(ValueError, match="same shadows of every seed"):
        ops.update_and_shadows_of(start.clone(), KEY, None, kind, seeds[:2], ((1e-3, 0.0), (1e-3, -1e-3)))


GROUP_SHAPES = [(64, 48), (16,), (1040,), (3, 1024), (32, 32), (8, 576)]  # 2-D take the decay, 1-D not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", directions.KINDS)
@pytest.mark.parametrize("record", ["none", "linear", "adam"])
@pytest.mark.parametrize("seeds", [1, 3])
def test_grouped_launch_equals_one_launch_per_tensor(ops, dtype, kind, record, seeds):
    """One launch over a unit's small tensors (``Group``) gives each tensor the bits of a launch of
    its own: the update (decay on 2-D tensors only), one seed's two shadows or several seeds' one."""
    pending = {"none": None, "linear": zo_sgd(0, *_update_args(2), 1e-3, 0.1), "adam": _adam_record()}[record]
    keys = [directions.stable_key(f"layers.0.t{i}") for i in range(len(GROUP_SHAPES))]
    pairs = ((1e-3, -1e-3),) if seeds == 1 else tuple((1e-3 * (j + 1), 0.0) for j in range(seeds))
    chosen = tuple(directions.step_seed(5, 12, j) for j in range(seeds))
    start = [_param(shape, dtype, seed=i).cuda() for i, shape in enumerate(GROUP_SHAPES)]
    grouped, alone = [t.clone() for t in start], [t.clone() for t in start]
    assert all(ops.groupable(t, pending) for t in grouped)
    group = ops.Group(grouped, keys, [t.ndim >= 2 for t in grouped])
    got = ops.update_and_shadows_grouped(group, pending, kind, chosen, pairs)
    for t, key, shadows in zip(alone, keys, got):
        want = ops.update_and_shadows_of(t, key, pending, kind, chosen, pairs)
        for (gp, gm), (wp, wm) in zip(shadows, want):
            assert torch.equal(gp, wp) and torch.equal(gm, wm)
    assert all(torch.equal(a, b) for a, b in zip(grouped, alone))
    assert (pending is None) == all(torch.equal(a, b) for a, b in zip(grouped, start))


def test_only_small_aligned_tensors_are_grouped(ops):
    assert ops.groupable(torch.zeros(4096, device="cuda"), None)
    assert not ops.groupable(torch.zeros(ops.GROUP_BELOW, device="cuda"), None)  # a launch of its own
    assert not ops.groupable(torch.zeros(4100, device="cuda"), None)  # not a multiple of 16
    assert not ops.groupable(torch.zeros(64, 48, device="cuda").t(), None)  # not contiguous
    assert not ops.groupable(torch.zeros(4096 + 8, device="cuda")[8:], None)  # not 16 elements aligned
    assert not ops.groupable(torch.zeros(4096, dtype=torch.float64, device="cuda"), None)  # the torch path


@pytest.mark.parametrize("family,dtype,lora", [("llama", torch.float32, False), ("llama", torch.bfloat16, False),
                                               ("opt", torch.bfloat16, False), ("llama", torch.bfloat16, True)])
def test_grouped_steps_equal_steps_of_one_launch_per_tensor(ops, monkeypatch, family, dtype, lora):
    """20 optimiser steps with a unit's small tensors in one launch equal those with a launch per
    tensor, loss for loss and bit for bit in the weights (and the grouped run did group)."""
    from distzo.models import LoraSettings, apply_lora

    base = tiny_model(family, dtype=dtype)
    if lora:
        base = apply_lora(base, LoraSettings(r=2, alpha=4))
        with torch.no_grad():  # B starts at zero: give the adapters something to perturb from
            for p in base.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.1)
    launch, launched = ops.update_and_shadows_grouped, []
    monkeypatch.setattr(ops, "update_and_shadows_grouped",
                        lambda group, *a, **k: launched.append(len(group.params)) or launch(group, *a, **k))

    def run(model):
        opt = ZOOptimizer(model.cuda(), lr=1e-3, eps=1e-3, weight_decay=0.1, seed=0)
        losses = [opt.step({k: v.cuda() for k, v in tiny_batch(seed=t).items()}).losses for t in range(20)]
        opt.flush()
        return losses, [p.detach().clone() for p in model.parameters()]

    grouped_losses, grouped = run(copy.deepcopy(base))
    assert launched and max(launched) > 1
    monkeypatch.setattr(ops, "GROUP_BELOW", 0)  # every tensor a launch of its own
    launched.clear()
    alone_losses, alone = run(copy.deepcopy(base))
    assert not launched
    assert grouped_losses == alone_losses
    assert all(torch.equal(a, b) for a, b in zip(grouped, alone))
    assert any(not torch.equal(a, b.cuda()) for a, b in zip(grouped, base.parameters()))


def test_non_contiguous_parameter(ops):
    base = _param((64, 96), torch.float32)
    ref = base.t().clone()  # contiguous copy of the transposed values
    got = base.cuda().t()  # a non-contiguous view of them
    assert not got.is_contiguous()
    update.apply_update_(ref, KEY, zo_sgd(0, [5], [2.0], 1e-2, 0.0))
    ops.apply_update(got, KEY, zo_sgd(0, [5], [2.0], 1e-2, 0.0))
    assert float((got.cpu() - ref).abs().max()) <= 1e-6 * float(ref.abs().max())


def test_float64_goes_through_the_reference_arithmetic(ops):
    ref = _param((40, 50), torch.float64)
    got = ref.cuda()
    update.apply_update_(ref, KEY, zo_sgd(0, [1, 2], [0.5, 3.0], 1e-2, 0.1))
    ops.apply_update(got, KEY, zo_sgd(0, [1, 2], [0.5, 3.0], 1e-2, 0.1))
    assert float((got.cpu() - ref).abs().max()) <= 1e-5 * 3.5e-2  # z's error times lr * sum |g| / q


# ------------------------------------------------------------------ full optimiser runs


def _run(model, steps, lr, eps, wd=0.1, q=1, torch_path=False):
    opt = ZOOptimizer(model, lr=lr, eps=eps, weight_decay=wd, directions=q, seed=0)
    if torch_path:
        opt._fused = None  # the reference path, on whatever device the model is
    stats = [opt.step(tiny_batch(seed=t)) for t in range(steps)]
    opt.flush()
    return stats


def _weights(model):
    return {n: p.detach().float().cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("q", [1, 2])
def test_fp32_run_on_cuda_matches_reference_on_cpu(q):
    cpu = tiny_model("llama")
    ref = copy.deepcopy(cpu)
    gpu = copy.deepcopy(cpu).cuda()
    stats = _run(gpu, 10, lr=1e-3, eps=1e-3, q=q)
    assert gpu.model.embed_tokens.weight.device.type == "cuda"
    for t, s in enumerate(stats):
        plus, minus, grads = mezo_step(ref, tiny_batch(seed=t), t, lr=1e-3, eps=1e-3, weight_decay=0.1, q=q,
                                       loss_fn=causal_lm_loss)
        assert s.losses_plus == pytest.approx(plus, abs=2e-5)
        assert s.losses_other == pytest.approx(minus, abs=2e-5)
        assert s.projected_grads == pytest.approx(grads, abs=2e-2)
    got, want = _weights(gpu), _weights(ref)
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-4


def test_bf16_run_on_cuda_matches_torch_path_and_cpu():
    # Same device, fused vs torch path: the forwards see shadows that differ in a few
    # elements by one ulp (z's error), so the losses agree to bf16 noise and g to that noise
    # over 2 eps; the weights then differ by at most lr * sum_t |dg_t| * |z| plus one ulp
    # per step where the two runs' roundings went different ways.
    lr, eps, steps = 1e-4, 1e-2, 6
    base = tiny_model("llama", dtype=torch.bfloat16)
    fused, plain, cpu = copy.deepcopy(base).cuda(), copy.deepcopy(base).cuda(), copy.deepcopy(base)
    s_fused = _run(fused, steps, lr=lr, eps=eps)
    s_plain = _run(plain, steps, lr=lr, eps=eps, torch_path=True)
    s_cpu = _run(cpu, steps, lr=lr, eps=eps)
    dloss = [max(abs(x - y) for x, y in zip(a.losses_plus + a.losses_other, b.losses_plus + b.losses_other))
             for a, b in zip(s_fused, s_plain)]
    dg = [abs(a.projected_grads[0] - b.projected_grads[0]) for a, b in zip(s_fused, s_plain)]
    dcpu = [abs(a.loss - c.loss) for a, c in zip(s_fused, s_cpu)]
    wf, wp = _weights(fused), _weights(plain)
    # an ulp of w is at most 2^-7 |w|; each step's rounding may differ by one
    excess = max(float(((wf[n] - wp[n]).abs() - steps * 2.0**-7 * torch.maximum(wf[n].abs(), wp[n].abs())).max())
                 for n in wf)
    differ = sum(int((wf[n] != wp[n]).sum()) for n in wf) / sum(w.numel() for w in wf.values())
    print(f"bf16 runs: loss diff {max(dloss):.2e}, g diff {max(dg):.2e} (g ~ {abs(s_fused[0].projected_grads[0]):.2f}), "
          f"cpu loss diff {max(dcpu):.2e}, weights differing {differ:.2e}, beyond rounding {excess:.2e}")
    assert max(dloss) <= 2e-3
    assert max(dg) <= 2e-3 / eps
    assert max(dcpu) <= 3e-2
    assert excess <= lr * sum(dg) * 6.0 + 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_run_on_cuda_replays_on_cuda_bit_for_bit(tmp_path, dtype):
    # Replay applies each logged update with the kernel the run applied it with, so the
    # weights it rebuilds are the run's, bit for bit (the torch path differs by z's error).
    base = tiny_model("llama", dtype=dtype)
    trained = copy.deepcopy(base).cuda()
    stats = _run(trained, 6, lr=1e-3, eps=1e-2, q=2)
    log = TrajectoryLog(tmp_path / "trajectory.jsonl")
    header = log.start(TrajectoryHeader(model="tiny", weight_decay=0.1, q=2, dtype=str(dtype).removeprefix("torch.")))
    for s in stats:
        log.append_update(s.update, s.loss, skipped=s.skipped)
    log.close()
    rebuilt = copy.deepcopy(base).cuda()
    replay_into(rebuilt, header, log.read())
    changed = any(not torch.equal(a, b.cuda()) for a, b in zip(trained.parameters(), base.parameters()))
    assert changed and all(torch.equal(a, b) for a, b in zip(trained.parameters(), rebuilt.parameters()))


@pytest.mark.parametrize("name,kind", [("fzoo", "gaussian"), ("fzoo", "rademacher-shared"), ("momentum", "gaussian"),
                                       ("momentum", "rademacher-shared"), ("momentum-adam", "gaussian"),
                                       ("momentum-adam", "rademacher-shared")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_algorithm_run_on_cuda_replays_on_cuda_bit_for_bit(tmp_path, name, kind, dtype):
    # records with many seeds and divisor 1 (and the adam rule's) run through the fused kernel and
    # replay through it; with rademacher-shared, a step's probes and a momentum window are lanes of
    # one family
    from distzo.algorithms.fzoo import FZOO
    from distzo.algorithms.momentum import Momentum

    algorithm = FZOO(lr=1e-3, eps=1e-2, weight_decay=0.1, probes=4) if name.startswith("fzoo") else \
        Momentum(beta=0.9, history=4, lr=1e-3, eps=1e-2, weight_decay=0.1, directions=2,
                 rule="adam" if name == "momentum-adam" else "heavy-ball")
    name = name.split("-")[0]
    base = tiny_model("llama", dtype=dtype)
    trained = copy.deepcopy(base).cuda()
    opt = ZOOptimizer(trained, algorithm=algorithm, perturbation=kind)
    assert opt._fused is not None
    stats = [opt.step(tiny_batch(seed=t)) for t in range(6)]
    opt.flush()
    log = TrajectoryLog(tmp_path / "trajectory.jsonl")
    header = log.start(TrajectoryHeader(model="tiny", weight_decay=0.1, dtype=str(dtype).removeprefix("torch."),
                                        algorithm=name, perturbation=kind))
    for s in stats:
        log.append_update(s.update, s.loss, skipped=s.skipped, **s.log)
    log.close()
    rebuilt = copy.deepcopy(base).cuda()
    replay_into(rebuilt, header, log.read())
    changed = any(not torch.equal(a, b.cuda()) for a, b in zip(trained.parameters(), base.parameters()))
    assert changed and all(torch.equal(a, b) for a, b in zip(trained.parameters(), rebuilt.parameters()))


# ------------------------------------------------------------------ masked (Sparse MeZO)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_update", [False, True])
def test_masked_update_and_shadows_are_the_unmasked_ones_selected(ops, dtype, with_update):
    # the masked pass is the unmasked arithmetic plus a select: bit for bit the unmasked result
    # where |theta| <= h (theta before the update for the update, after it for the shadows)
    shape, eps, seed = (513, 200), 1e-3, directions.step_seed(5, 12, 0)
    seeds, grads = _update_args(2)
    start = _param(shape, dtype, seed=1).cuda()
    h = float(start.float().abs().flatten().kthvalue(start.numel() // 4).values)
    pending = zo_sgd(0, seeds, grads, 1e-3, 0.1) if with_update else None
    plain, masked = start.clone(), start.clone()
    ops.update_and_shadows(plain, KEY, pending, "gaussian", seed, (eps, -eps))
    shadows = ops.update_and_shadows(masked, KEY, pending, "gaussian", seed, (eps, -eps), h)
    before = start.float().abs() <= h
    assert torch.equal(masked, torch.where(before, plain, start))
    after = masked.float().abs() <= h
    unmasked = ops.update_and_shadows(masked.clone(), KEY, None, "gaussian", seed, (eps, -eps))
    for got, want in zip(shadows, unmasked):
        assert torch.equal(got, torch.where(after, want, masked))
    if not with_update:
        return
    assert torch.any(masked != start)
    # the update alone masks the same way; so does the torch path, given the kernel's z
    alone = start.clone()
    ops.apply_update(alone, KEY, pending, "gaussian", h)
    assert torch.equal(alone, masked)
    ref = start.clone()
    zs = [ops.normal(s, KEY, 0, start.numel(), device="cuda").view(shape) for s in seeds]
    update.apply_update_(ref, KEY, pending, cached=zs, threshold=h)
    assert torch.equal(ref[~before], start[~before])
    assert float((ref.float() - masked.float()).abs().max()) <= 2.0**-7 * float(start.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_run_on_cuda_replays_on_cuda_bit_for_bit(tmp_path, dtype):
    from distzo.algorithms.sparse import SparseMeZO

    base = tiny_model("llama", dtype=dtype)
    trained = copy.deepcopy(base).cuda()
    opt = ZOOptimizer(trained, algorithm=SparseMeZO(0.75, lr=1e-3, eps=1e-2, weight_decay=0.1, directions=2))
    assert opt._fused is not None
    stats = [opt.step(tiny_batch(seed=t)) for t in range(6)]
    opt.flush()
    log = TrajectoryLog(tmp_path / "trajectory.jsonl")
    header = log.start(TrajectoryHeader(model="tiny", weight_decay=0.1, q=2, dtype=str(dtype).removeprefix("torch."),
                                        algorithm="sparse"))
    for s in stats:
        log.append_update(s.update, s.loss, skipped=s.skipped, **s.log)
    log.close()
    rebuilt = copy.deepcopy(base).cuda()
    replay_into(rebuilt, header, log.read())
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), rebuilt.parameters()))
    masks = opt.algorithm.masks
    for (name, a), b in zip(trained.named_parameters(), base.parameters()):
        if name in masks:  # a weight above its threshold never moves, so never drops below it
            large = b.float().abs() > masks[name]
            assert torch.equal(a.cpu()[large], b[large]) and torch.any(a.cpu() != b)
