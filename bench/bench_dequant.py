"""bitsandbytes' 4-bit dequantization against a Triton kernel of the same arithmetic, one OPT-175B layer.

    PYTHONPATH=src python bench/bench_dequant.py --out dequant.json

The six weights of an OPT-175B decoder layer (q, k, v, out: 12288 x 12288; fc1 49152 x 12288; fc2
12288 x 49152) drawn N(0, 0.02) in bf16 on the GPU and quantized by bitsandbytes (blocksize 64, no
double quantization). For NF4 and FP4: the median time of dequantizing all six to bf16 with
bitsandbytes' CUDA kernel and with the kernel below, the bytes moved per second (codes and absmax
read, bf16 written) against a plain device copy of as many bytes, and whether the outputs are equal
bit for bit (also for fp16 and fp32 outputs).

The kernel (bench-only; the library computes with bitsandbytes' own): for weight i, the 4-bit code
in the high nibble of byte i // 2 when i is even, the low one when odd, its value in the format's
table of 16 float32 values (bitsandbytes' get_4bit_type) times the float32 absmax of block
i // blocksize, rounded to nearest even. The question it answers: how much of a QLoRA step's
dequantization is left to take out by a faster kernel (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import Recorder, environment, timed_ms  # noqa: E402

BYTES, WARPS = 2048, 4  # the fastest of 3 x 3 sizes and warp counts on an H200
OUT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _bf16_nearest_even(x):
    """float32 -> bfloat16, rounded to nearest even, in integer steps: the GPU's conversion does
    the same, but the interpreter's truncates (and these values are finite: no NaN case)."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequant_kernel(codes_ptr, absmax_ptr, table_ptr, out_ptr, n_out, BLOCKSIZE: tl.constexpr,
                    BYTES: tl.constexpr, OUT: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BYTES
    byte = start + tl.arange(0, BYTES)
    live = byte * 2 < n_out
    codes = tl.load(codes_ptr + byte, mask=live, other=0, eviction_policy="evict_first").to(tl.int32)
    # both weights of a byte are in one absmax block: blocksize is even
    scale = tl.load(absmax_ptr + (byte * 2) // BLOCKSIZE, mask=live, other=0.0, eviction_policy="evict_last")
    table = tl.load(table_ptr + tl.arange(0, 16))  # in registers: 1.10x faster than a load per code
    high = tl.gather(table, codes >> 4, 0) * scale  # the even weight
    low = tl.gather(table, codes & 15, 0) * scale
    out = tl.interleave(high, low)
    if OUT == tl.bfloat16:
        out = _bf16_nearest_even(out)
    else:
        out = out.to(OUT)
    index = start * 2 + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + index, out, mask=index < n_out)


def dequantize_4bit_(codes, absmax, blocksize: int, table, out):
    """``table``: the format's 16 float32 values on the device (built once, outside the timed calls)."""
    codes = codes.contiguous().view(torch.uint8).reshape(-1)
    n_out = out.numel()
    grid = (triton.cdiv(triton.cdiv(n_out, 2), BYTES),)
    _dequant_kernel[grid](codes, absmax, table, out, n_out, BLOCKSIZE=blocksize, BYTES=BYTES, OUT=OUT[out.dtype],
                          num_warps=WARPS)
    return out


def _median_ms(fn) -> float:
    return timed_ms(fn, torch.device("cuda"), 20, 3)["median_ms"]


def main(argv=None) -> int:
    import bitsandbytes.functional as F
    from bitsandbytes.backends.cuda import ops

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
                dequantize_4bit_(q, st.absmax, 64, table, o)

        moved = sum(q.numel() + st.absmax.numel() * 4 + o.numel() * 2 for (q, st), o in zip(weights, outs))
        equal = {}
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            ok = True
            for q, st in weights:
                a = torch.empty(st.shape, dtype=dtype, device="cuda")
                b = torch.empty_like(a)
                bnb(q, st.absmax, 64, qt, dtype, a)
                dequantize_4bit_(q, st.absmax, 64, table, b)
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
