"""The fused kernels under Triton's interpreter, on a CPU: what can be checked without a GPU.

    pip install --no-deps --target /tmp/triton triton==3.6.0
    PYTHONPATH=/tmp/triton:src TRITON_INTERPRET=1 python bench/interpret_check.py

The interpreter runs the kernels' Python on numpy, so their integer work — the Philox words, the
uniforms, every sign kind — must equal ``distzo.directions`` bit for bit, and a float32 update
and its shadows must agree with the CPU's arithmetic as tests/test_kernels.py asks of a GPU. It
cannot judge half precision (its float32 -> bfloat16 conversion truncates instead of rounding to
nearest) nor speed; the GPU tests remain the check of both.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

from distzo import directions
from distzo.kernels import triton_ops as ops
from distzo.records import UpdateRecord
from distzo.update import apply_update_, perturbed

KEY = 0x1234_5678_9ABC
SPANS = [(0, 1), (0, 1024), (3, 5000), (127, 130), (128 * 7 + 5, 3000), (1 << 20, 2049)]


def check_draws() -> None:
    for start, count in SPANS:
        assert torch.equal(ops.raw_words(7, KEY, start, count, device="cpu"),
                           directions.raw_words(7, KEY, start, count)), (start, count)
        assert torch.equal(ops.uniform(7, KEY, start, count, device="cpu"),
                           directions.uniform(7, KEY, start, count)), (start, count)
        for kind in directions.KINDS:
            z = ops.normal(7, KEY, start, count, kind, device="cpu")
            ref = directions.draw(7, KEY, start, count, kind)
            if kind == "gaussian":  # libm against the interpreter's numpy: a few ulps
                assert float((z - ref).abs().max()) <= 1e-5, (kind, start, count)
            else:
                assert torch.equal(z, ref), (kind, start, count)


def check_fused_pass() -> None:
    record = UpdateRecord(0, (11, 12, 13), (0.7, -1.2, 0.3), 1e-2, divisor=3, decay=0.1, rounding_seed=77)
    # rademacher-shared: shadow seed 21 is a lane of the update's family (its words carried from the
    # update to the shadows), 85 of another
    cases = [(kind, 21) for kind in directions.KINDS] + [("rademacher-shared", 85)]
    for kind, seed in cases:
        for shape in ((4099,), (64, 48), (3, 1000)):
            start = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
            got, want = start.clone(), start.clone()
            plus, minus = ops.update_and_shadows(got, KEY, record, kind, seed, (1e-3, -1e-3))
            apply_update_(want, KEY, record, kind)
            assert float((got - want).abs().max()) <= 1e-6 * float(start.abs().max()), (kind, shape)
            z = directions.draw(seed, KEY, 0, got.numel(), kind).view(shape)
            for shadow, scale in ((plus, 1e-3), (minus, -1e-3)):
                ref = perturbed(got, z, scale)
                if kind == "gaussian":
                    assert float((shadow - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), (kind, shape)
                else:  # s z is exact for signs: one rounding either way
                    assert torch.equal(shadow, ref), (kind, shape)
            again = start.clone()
            ops.apply_update(again, KEY, record, kind)
            assert torch.equal(again, got), (kind, shape)


def check_adam_pass() -> None:
    """An Adam-like record (momentum's adam rule) in the fused pass: m / (sqrt(v) + delta) from the
    regenerated directions agrees with update._adam_step's torch arithmetic, decay and mask included;
    its shadows are built from theta after it. Records with groups of unequal size take the torch path."""
    from distzo.algorithms.momentum import weights

    w1, w2 = weights(0.9, 3), weights(0.99, 3)
    record = UpdateRecord(0, (11, 12, 13, 14, 15, 16), (0.7, -1.2, 0.3, 2.0, -0.4, 0.9), 1e-2, divisor=1,
                          decay=0.1, rounding_seed=77, adam=tuple((2, a, b) for a, b in zip(w1, w2)), delta=1e-8)
    for kind in directions.KINDS:
        for shape, threshold in (((4099,), None), ((64, 48), None), ((64, 48), 0.04)):
            start = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.05
            got, want = start.clone(), start.clone()
            assert not ops.torch_path(got, record)
            plus, minus = ops.update_and_shadows(got, KEY, record, kind, 21, (1e-3, -1e-3), threshold)
            apply_update_(want, KEY, record, kind, threshold=threshold)
            # each element moves by about lr (m / sqrt(v) is of order 1): float32 agreement is ~1e-6 of that
            assert float((got - want).abs().max()) <= 1e-6 * float(start.abs().max()), (kind, shape)
            assert float((got - start).abs().max()) > 1e-3, (kind, shape)  # the update moved theta
            z = directions.draw(21, KEY, 0, got.numel(), kind).view(shape)
            for shadow, scale in ((plus, 1e-3), (minus, -1e-3)):
                ref = perturbed(got, z, scale, threshold)
                assert float((shadow - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), (kind, shape)
    uneven = UpdateRecord(0, (11, 12, 13), (0.7, -1.2, 0.3), 1e-2, divisor=1, rounding_seed=77,
                          adam=((2, 0.6, 0.5), (1, 0.4, 0.5)), delta=1e-8)
    assert ops.torch_path(torch.zeros(4), uneven)


def check_many_seeds() -> None:
    """One pass writing the shadows of several seeds equals one pass per seed, bit for bit: the
    update applied once, each seed's shadows from theta after it."""
    record = UpdateRecord(0, (11, 12), (0.7, -1.2), 1e-2, divisor=2, decay=0.1, rounding_seed=77)
    # rademacher-shared: seeds of one family (lanes of seed 0's words), and seeds that change family
    # from one to the next and back (the words drawn again each time)
    mixed = UpdateRecord(0, (11, 44, 12), (0.7, -1.2, 0.4), 1e-2, divisor=3, decay=0.1, rounding_seed=77)
    ends_elsewhere = UpdateRecord(0, (11, 44), (0.7, -1.2), 1e-2, divisor=2, decay=0.1, rounding_seed=77)
    cases = [(kind, record, (21, 22, 23, 24, 25)) for kind in directions.KINDS]
    cases += [("rademacher-shared", mixed, (21, 53, 22, 85, 86)), ("rademacher-shared", ends_elsewhere, (21, 22))]
    for kind, record, seeds in cases:
        for shape in ((4099,), (64, 48)):  # a length that is a multiple of 16 and one that is not
            for pairs, threshold in itertools.product(
                    (tuple((1e-3 * (i + 1), 0.0) for i in range(len(seeds))),
                     tuple((1e-3, -1e-3 * (i + 1)) for i in range(len(seeds)))), (None, 0.04)):
                start = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
                many, one = start.clone(), start.clone()
                got = ops.update_and_shadows_of(many, KEY, record, kind, seeds, pairs, threshold)
                want = [ops.update_and_shadows(one, KEY, record if i == 0 else None, kind, s, pair, threshold)
                        for i, (s, pair) in enumerate(zip(seeds, pairs))]
                assert torch.equal(many, one), (kind, shape)
                for (gp, gm), (wp, wm), pair in zip(got, want, pairs):
                    assert torch.equal(gp, wp), (kind, shape, pair)
                    assert torch.equal(gm, wm) and (pair[1] != 0.0 or gm is many), (kind, shape, pair)


def check_grouped() -> None:
    """One grouped launch over several tensors equals one launch per tensor, bit for bit: updates
    (with the decay only on the 2-D tensors), shadows of one seed or of several, Adam-like records."""
    from distzo.algorithms.momentum import weights

    linear = UpdateRecord(0, (11, 12), (0.7, -1.2), 1e-2, divisor=2, decay=0.1, rounding_seed=77)
    adam = UpdateRecord(0, (11, 12, 13, 14), (0.7, -1.2, 0.3, 2.0), 1e-2, divisor=1, decay=0.1, rounding_seed=77,
                        adam=tuple((2, a, b) for a, b in zip(weights(0.9, 2), weights(0.99, 2))), delta=1e-8)
    shapes = ((64, 48), (16,), (1040,), (3, 1024), (32, 32))
    for kind, record, (seeds, pairs) in itertools.product(
            directions.KINDS, (None, linear, adam),
            (((21,), ((1e-3, -1e-3),)), ((21, 22, 23), ((1e-3, 0.0), (2e-3, 0.0), (3e-3, 0.0))))):
        gen = torch.Generator().manual_seed(3)
        start = [torch.randn(shape, generator=gen) * 0.05 for shape in shapes]
        grouped, alone = [t.clone() for t in start], [t.clone() for t in start]
        keys = [KEY + i for i in range(len(shapes))]
        group = ops.Group(grouped, keys, [t.ndim >= 2 for t in grouped])
        got = ops.update_and_shadows_grouped(group, record, kind, seeds, pairs)
        for t, key, shadows in zip(alone, keys, got):
            want = ops.update_and_shadows_of(t, key, record, kind, seeds, pairs)
            for (gp, gm), (wp, wm) in zip(shadows, want):
                assert torch.equal(gp, wp) and torch.equal(gm, wm), (kind, record, seeds)
        assert all(torch.equal(a, b) for a, b in zip(grouped, alone)), (kind, record)
        if record is not None:
            assert not torch.equal(grouped[0], start[0]) and not torch.equal(grouped[1], start[1])


def _steps(algorithm, most: int, **settings) -> tuple[list, dict, int]:
    """Three steps of a tiny Llama through ZOOptimizer on the fused kernels (run by the interpreter
    on CPU tensors), the passes writing at most ``most`` shadow seeds each: the losses, the
    weights, and the most seeds a pass wrote."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distzo import kernels
    from distzo.optimizer import ZOOptimizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    fused_for, pin, most_before, of = kernels.fused_for, torch.Tensor.pin_memory, ops.MAX_SHADOW_SEEDS, \
        ops.update_and_shadows_of
    widths: list[int] = []

    def counted(param, key, record, kind, seeds, *rest, **named):
        widths.append(len(seeds))
        return of(param, key, record, kind, seeds, *rest, **named)

    kernels.fused_for = lambda tensor: ops  # the CPU's tensors through the kernels
    ops.update_and_shadows_of = counted
    torch.Tensor.pin_memory = lambda self: self  # no CUDA to pin for: the launch arguments' refresh copies
    ops.MAX_SHADOW_SEEDS = most
    try:
        opt = ZOOptimizer(model, lr=1e-3, eps=1e-2, algorithm=algorithm, **settings)
        assert opt._fused is ops
        losses = [(s.losses_plus, s.losses_other, s.projected_grads) for s in (opt.step(batch) for _ in range(3))]
        opt.flush()
    finally:
        kernels.fused_for, torch.Tensor.pin_memory, ops.MAX_SHADOW_SEEDS = fused_for, pin, most_before
        ops.update_and_shadows_of = of
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, max(widths)


def check_optimizer_launches() -> None:
    """The optimizer's passes of many seeds (FZOO's probes, ZO-SGD's directions in one forward) give
    the steps that one pass per seed gives, loss for loss and bit for bit in the weights."""
    from distzo.algorithms.fzoo import FZOO
    from distzo.algorithms.mezo import MeZO

    for algorithm, settings in ((lambda: FZOO(lr=1e-3, eps=1e-2, probes=6), {"perturbation": "rademacher-packed"}),
                                (lambda: FZOO(lr=1e-3, eps=1e-2, probes=5), {"perturbation": "rademacher-shared"}),
                                (lambda: FZOO(lr=1e-3, eps=1e-2, probes=3), {"perturbation": "gaussian"}),
                                (lambda: MeZO(lr=1e-3, eps=1e-2, directions=3),  # the 3 pairs in one forward
                                 {"perturbation": "rademacher", "merge_forwards": True})):
        kind = settings["perturbation"]
        many, weights, widest = _steps(algorithm(), 16, **settings)
        one, reference, single = _steps(algorithm(), 1, **settings)
        assert widest > 1 and single == 1, (kind, widest, single)  # both ways were taken
        assert many == one, (kind, many, one)
        assert all(torch.equal(weights[k], reference[k]) for k in weights), kind


def check_optimizer_grouped() -> None:
    """The optimizer's grouped launches (every tensor of the tiny Llama's blocks is small) give the
    steps that one launch per tensor gives, loss for loss and bit for bit in the weights."""
    below, launch = ops.GROUP_BELOW, ops.update_and_shadows_grouped
    calls: list[int] = []

    def counted(group, *rest, **named):
        calls.append(len(group.params))
        return launch(group, *rest, **named)

    ops.update_and_shadows_grouped = counted
    try:
        _compare_grouped(below, calls)
    finally:
        ops.update_and_shadows_grouped = launch


def _compare_grouped(below: int, calls: list[int]) -> None:
    from distzo.algorithms.fzoo import FZOO
    from distzo.algorithms.mezo import MeZO

    for algorithm, settings in ((lambda: MeZO(lr=1e-3, eps=1e-2, weight_decay=0.1), {"perturbation": "gaussian"}),
                                (lambda: FZOO(lr=1e-3, eps=1e-2, probes=3), {"perturbation": "rademacher"})):
        calls.clear()
        grouped, weights, _ = _steps(algorithm(), 16, **settings)
        assert calls and max(calls) == 9, calls  # a block's nine tensors in one launch
        ops.GROUP_BELOW = 0  # no tensor is grouped
        try:
            calls.clear()
            alone, reference, _ = _steps(algorithm(), 16, **settings)
            assert not calls
        finally:
            ops.GROUP_BELOW = below
        assert grouped == alone, (settings, grouped, alone)
        assert all(torch.equal(weights[k], reference[k]) for k in weights), settings


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1 (and Triton on PYTHONPATH): see the module's docstring", file=sys.stderr)
        return 2
    check_draws()
    print(f"draws: raw words, uniforms and {', '.join(directions.KINDS)} agree with distzo.directions")
    check_fused_pass()
    print("fused pass (float32): updates, shadows and the update alone agree with the CPU arithmetic")
    check_adam_pass()
    print("fused pass of an Adam-like record: agrees with the torch arithmetic (decay, mask, shadows)")
    check_many_seeds()
    print("fused pass of several seeds (masked and not): equal to one pass per seed, bit for bit")
    check_optimizer_launches()
    print("optimizer: FZOO's and ZO-SGD's passes of several seeds step as one pass per seed does")
    check_grouped()
    print("grouped launch: equal to one launch per tensor, bit for bit (updates, decay, seeds, adam)")
    check_optimizer_grouped()
    print("optimizer: grouped launches step as one launch per tensor does")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
