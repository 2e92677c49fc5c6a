"""bitsandbytes' 4-bit dequantization against a Triton kernel of the same arithmetic, one OPT-175B layer.

    PYTHONPATH=src python bench/bench_dequant.py --out dequant.json

The six weights of an OPT-175B decoder layer (q, k, v, out: 12288 x 12288; fc1 49152 x 12288; fc2
12288 x 49152) drawn N(0, 0.02) in bf16 on the GPU and quantized by bitsandbytes (blocksize 64, no
double quantization). For NF4 and FP4: the median time of dequantizing all six to bf16 with
bitsandbytes' CUDA kernel and with the kernel below, the bytes moved per second (codes and absmax
read, bf16 written) against a plain device copy of as many bytes, and whether the outputs are equal
bit for bit (also for fp16 and fp32 outputs).

The kernel is distzo's (``distzo.kernels.dequant``, what an NF4 base's forward runs on CUDA): for
weight i, the 4-bit code in the high nibble of byte i // 2 when i is even, the low one when odd, its
value in the format's table of 16 float32 values (bitsandbytes' get_4bit_type) times the float32
absmax of block i // blocksize, rounded to nearest even. distzo uses it for NF4 only: on the GPU,
bitsandbytes' FP4 constants are not its table's, and the FP4 row shows by how much.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import Recorder, environment, timed_ms  # noqa: E402

def _median_ms(fn) -> float:
    return timed_ms(fn, torch.device("cuda"), 20, 3)["median_ms"]


def main(argv=None) -> int:
    import bitsandbytes.functional as F
    from bitsandbytes.backends.cuda import ops

    from distzo.kernels.dequant import dequantize_4bit

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    d, f = 12288, 49152
    shapes = [(d, d)] * 4 + [(f, d), (d, f)]
    torch.manual_seed(0)
    rec = Recorder(args.out, environment(torch.device("cuda"), sys.argv[1:] if argv is None else argv,
                                         "bench_dequant.py", ("triton", "bitsandbytes")))
    rec.put("setup", {"shapes": shapes})
    bnb = ops._dequantize_4bit_impl
    for qt in ("nf4", "fp4"):
        weights = []
        for shape in shapes:
            w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
            q, st = F.quantize_4bit(w, blocksize=64, quant_type=qt)
            weights.append((q, st))
            del w
        outs = [torch.empty(st.shape, dtype=torch.bfloat16, device="cuda") for _, st in weights]
        table = F.get_4bit_type(qt, device="cuda").to(torch.float32)

        def theirs():
            for (q, st), o in zip(weights, outs):
                bnb(q, st.absmax, 64, qt, torch.bfloat16, o)

        def ours():
            for (q, st), o in zip(weights, outs):
                dequantize_4bit(q, st.absmax, 64, table, o)

        moved = sum(q.numel() + st.absmax.numel() * 4 + o.numel() * 2 for (q, st), o in zip(weights, outs))
        equal = {}
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            ok = True
            for q, st in weights:
                a = torch.empty(st.shape, dtype=dtype, device="cuda")
                b = torch.empty_like(a)
                bnb(q, st.absmax, 64, qt, dtype, a)
                dequantize_4bit(q, st.absmax, 64, table, b)
                ok &= torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                del a, b
            equal[str(dtype)] = bool(ok)
        t_bnb, t_ours = _median_ms(theirs), _median_ms(ours)
        rec.put(qt, {"bitsandbytes_ms": t_bnb, "triton_ms": t_ours, "speedup": t_bnb / t_ours,
                     "bitsandbytes_TBps": moved / t_bnb / 1e9, "triton_TBps": moved / t_ours / 1e9,
                     "bits_equal": equal, "GB_moved": moved / 1e9})
        if qt == "nf4":
            x = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
            y = torch.empty_like(x)
            t_copy = _median_ms(lambda: y.copy_(x))
            rec.put("copy", {"TBps": moved / t_copy / 1e9})  # read moved/2, write moved/2
            del x, y
        del weights, outs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
