"""Rows of activations to float8 e4m3 with one float32 scale each, for a scaled fp8 GEMM.

Row i's scale is its largest magnitude (at least ``TINY``, so that a row of zeros stays zeros) over
448, e4m3's largest value; its entries are multiplied by 448 over that magnitude (both divisions
rounded to nearest, as torch's are) and rounded to e4m3 (nearest even, as torch's cast rounds). One
program a row: it reads the row twice, the second time mostly from L2, and writes a byte a value.
A NaN anywhere in a row makes its scale NaN, so a NaN input still gives a NaN output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
TINY = 2.0**-100  # 448 / TINY is finite in float32, so an all-zero row scales to zeros, not NaN
BLOCK, WARPS = 1024, 4


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, K, BLOCK: tl.constexpr, TOP: tl.constexpr,
                          FLOOR: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * K
    cols = tl.arange(0, BLOCK)
    peak = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, K, BLOCK):
        v = tl.load(x_ptr + row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
        peak = _max_keeping_nan(peak, tl.abs(v))
    peak = _max_keeping_nan(tl.reduce(peak, 0, _max_keeping_nan, keep_dims=True), FLOOR)  # shape (1,)
    top = tl.full((1,), TOP, tl.float32)
    inv = tl.math.div_rn(top, peak)
    tl.store(scale_ptr + tl.program_id(0) + tl.arange(0, 1), tl.math.div_rn(peak, top))
    for start in range(0, K, BLOCK):
        live = start + cols < K
        v = tl.load(x_ptr + row + start + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + row + start + cols, (v * inv).to(tl.float8e4nv), mask=live)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D, contiguous, bf16/fp16/fp32, on a GPU) as float8 e4m3 rows and their float32 scales
    (shape rows x 1: the form ``torch._scaled_mm`` takes for its first operand)."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError("quantize_rows takes a contiguous 2-D tensor")
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _quantize_rows_kernel[(x.shape[0],)](x, out, scale, x.shape[1], BLOCK=BLOCK, TOP=E4M3_MAX, FLOOR=TINY,
                                             num_warps=WARPS)
    return out, scale
