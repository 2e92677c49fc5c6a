"""Throughput of the fused ZO pass on one large tensor, against the device's copy bandwidth.

    PYTHONPATH=src python bench/kernel_bench.py --out kernels.json

Times (median of CUDA-event runs) on a bf16 4096 x 16384 tensor (an OPT-6.7B MLP weight):
  copy          torch copy_ of the tensor (bytes read + written = 2 x size): the bandwidth ceiling
  shadows       update_and_shadows without an update (read 2 B, write 2 x 2 B per element)
  step          update_and_shadows with a one-direction update (read 2, write 2 + 2 + 2)
  update        apply_update alone (read 2, write 2)
  mezo_pass     one of MeZO's perturbation passes: z = torch.normal(...); p = p + s * z * eps
for a few block shapes and both Box-Muller variants, and the host time of one launch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def bench(fn, reps=15, warmup=3, inner=10):
    """Median ms of one fn() call, timed over `inner` back-to-back calls so that the
    host's launch latency hides behind the device work."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=16384)
    ap.add_argument("--shapes", nargs="+", default=["512x2", "512x4", "1024x2", "1024x4", "1024x8", "2048x8"],
                    help="BLOCKxWARPS launch shapes to time (the libdevice variant runs with 1024x4)")
    args = ap.parse_args()

    from distzo.kernels import triton_ops as K
    from distzo.records import zo_sgd

    dev = torch.device("cuda")
    n = args.rows * args.cols
    p = (torch.randn(args.rows, args.cols, device=dev) * 0.02).to(torch.bfloat16)
    dst = torch.empty_like(p)
    pending = zo_sgd(0, [123456789], [3.5], 1e-6, 0.0)
    results = {"device": torch.cuda.get_device_name(), "numel": n, "dtype": "bfloat16"}

    copy_ms = bench(lambda: dst.copy_(p))
    bw = 2 * p.numel() * 2 / (copy_ms * 1e-3)
    results["copy_ms"], results["copy_GBps"] = copy_ms, bw / 1e9

    def mezo_pass():
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.data = p.data + 1.0 * z * 1e-3

    results["mezo_pass_ms"] = bench(mezo_pass)

    default = (K._BLOCK, K._WARPS, K.FAST_MATH)
    variants = []
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    for fast in (True, False):
        for block, warps in shapes if fast else [(1024, 4)]:
            K._BLOCK, K._WARPS, K.FAST_MATH = block, warps, fast
            row = {"block": block, "warps": warps, "fast_math": fast}
            row["shadows_ms"] = bench(lambda: K.update_and_shadows(p, 77, None, "gaussian", 99, (1e-3, -1e-3)))
            row["step_ms"] = bench(lambda: K.update_and_shadows(p, 77, pending, "gaussian", 99, (1e-3, -1e-3)))
            row["update_ms"] = bench(lambda: K.apply_update(p, 77, zo_sgd(0, [5], [1.0], 1e-6, 0.0)))
            for what, nbytes in (("shadows", 6), ("step", 8), ("update", 4)):
                row[f"{what}_GBps"] = nbytes * n / (row[f"{what}_ms"] * 1e-3) / 1e9
            variants.append(row)
            print(row, flush=True)
    K._BLOCK, K._WARPS, K.FAST_MATH = default
    results["variants"] = variants

    small = torch.randn(4096, device=dev).to(torch.bfloat16)
    for _ in range(10):
        K.update_and_shadows(small, 5, pending, "gaussian", 9, (1e-3, -1e-3))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    calls = 2000
    for _ in range(calls):
        K.update_and_shadows(small, 5, pending, "gaussian", 9, (1e-3, -1e-3))
    host_us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    results["host_us_per_call"] = host_us

    print(f"device {results['device']}: copy {results['copy_GBps']:.0f} GB/s ({copy_ms:.3f} ms), "
          f"MeZO pass {results['mezo_pass_ms']:.3f} ms, host {host_us:.1f} us/call")
    print(f"{'block':>6} {'warps':>5} {'fast':>5} {'shadows ms':>10} {'step ms':>8} {'update ms':>9} {'step GB/s':>9}")
    for r in variants:
        print(f"{r['block']:>6} {r['warps']:>5} {r['fast_math']!s:>5} {r['shadows_ms']:>10.3f} {r['step_ms']:>8.3f} "
              f"{r['update_ms']:>9.3f} {r['step_GBps']:>9.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
