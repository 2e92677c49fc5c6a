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
    for kind in directions.KINDS:
        for shape in ((4099,), (64, 48), (3, 1000)):
            start = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
            got, want = start.clone(), start.clone()
            plus, minus = ops.update_and_shadows(got, KEY, record, kind, 21, (1e-3, -1e-3))
            apply_update_(want, KEY, record, kind)
            assert float((got - want).abs().max()) <= 1e-6 * float(start.abs().max()), (kind, shape)
            z = directions.draw(21, KEY, 0, got.numel(), kind).view(shape)
            for shadow, scale in ((plus, 1e-3), (minus, -1e-3)):
                ref = perturbed(got, z, scale)
                if kind == "gaussian":
                    assert float((shadow - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), (kind, shape)
                else:  # s z is exact for signs: one rounding either way
                    assert torch.equal(shadow, ref), (kind, shape)
            again = start.clone()
            ops.apply_update(again, KEY, record, kind)
            assert torch.equal(again, got), (kind, shape)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1 (and Triton on PYTHONPATH): see the module's docstring", file=sys.stderr)
        return 2
    check_draws()
    print(f"draws: raw words, uniforms and {', '.join(directions.KINDS)} agree with distzo.directions")
    check_fused_pass()
    print("fused pass (float32): updates, shadows and the update alone agree with the CPU arithmetic")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
