"""NF4 dequantization on CUDA, bit for bit bitsandbytes', in about 0.6x its time.

Weight i of a 4-bit tensor in bitsandbytes' layout has its code in the high nibble of byte i // 2
when i is even, in the low one when odd; its value is the NF4 table's entry for the code times the
float32 absmax of block i // blocksize, rounded to the output dtype (nearest even). That is the
whole arithmetic of bitsandbytes' CUDA kernel, so the outputs are equal bit for bit (tests/
test_linear4bit.py checks bf16, fp16 and fp32 on a GPU). What differs is the speed: on an H200 the
six weights of an OPT-175B layer dequantize in 1.19–1.22 ms against bitsandbytes' 1.91 (docs/
benchmarks.md), with the 16-entry table held in registers, the codes read a word (8 weights) at a
time and each thread's output written as whole vectors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WORDS, WARPS = 256, 4  # 2,048 weights a program: the fastest of the sizes and layouts tried on an H200
_OUT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
        torch.float8_e4m3fn: tl.float8e4nv}


@triton.jit
def _dequant_words_kernel(words_ptr, absmax_ptr, table_ptr, out_ptr, rows_ptr, row_len, BLOCKSIZE: tl.constexpr,
                          WORDS: tl.constexpr, OUT: tl.constexpr, ROW_SCALED: tl.constexpr):
    word = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)
    words = tl.load(words_ptr + word, eviction_policy="evict_first")
    # weight 8w + k is byte 4w + k // 2 of the little-endian word, its high nibble when k is even
    k = tl.arange(0, 8)
    codes = (words[:, None] >> (8 * (k // 2) + 4 * (1 - k % 2))[None, :]) & 15
    index = tl.program_id(0).to(tl.int64) * WORDS * 8 + tl.arange(0, WORDS * 8)
    table = tl.load(table_ptr + tl.arange(0, 16))
    value = tl.gather(table, tl.reshape(codes, (WORDS * 8,)), 0) * tl.load(absmax_ptr + index // BLOCKSIZE)
    if ROW_SCALED:
        value = value * tl.load(rows_ptr + index // row_len)
    tl.store(out_ptr + index, value.to(OUT))


@triton.jit
def _dequant_bytes_kernel(codes_ptr, absmax_ptr, table_ptr, out_ptr, rows_ptr, row_len, n_out, first,
                          BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr, OUT: tl.constexpr, ROW_SCALED: tl.constexpr):
    """The same a byte at a time, masked: the tail past the last whole word program (or all of a
    tensor whose codes do not start on a word)."""
    byte = (tl.program_id(0) + first).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    live = byte * 2 < n_out
    codes = tl.load(codes_ptr + byte, mask=live, other=0).to(tl.int32)
    # both weights of a byte share one absmax block: blocksize is even
    scale = tl.load(absmax_ptr + (byte * 2) // BLOCKSIZE, mask=live, other=0.0)
    table = tl.load(table_ptr + tl.arange(0, 16))
    value = tl.interleave(tl.gather(table, codes >> 4, 0) * scale, tl.gather(table, codes & 15, 0) * scale)
    index = (tl.program_id(0) + first).to(tl.int64) * 2 * BYTES + tl.arange(0, 2 * BYTES)
    if ROW_SCALED:
        value = value * tl.load(rows_ptr + index // row_len, mask=index < n_out, other=0.0)
    tl.store(out_ptr + index, value.to(OUT), mask=index < n_out)


def dequantize_4bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, table: torch.Tensor,
                    out: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (contiguous: bf16/fp16/fp32, or float8 e4m3 with ``row_scale``) = the 4-bit ``codes``
    dequantized with ``table`` (the format's 16 float32 values) and the float32 ``absmax`` of each
    ``blocksize`` weights; with ``row_scale`` (float32, one per row of the 2-D ``out``) each value also
    multiplied by its row's."""
    if blocksize % 2 or not out.is_contiguous():
        raise ValueError("dequantize_4bit needs an even blocksize and a contiguous output")
    if (out.dtype == torch.float8_e4m3fn) != (row_scale is not None):
        raise ValueError("dequantize_4bit takes a row_scale for float8 outputs, and only for them")
    if row_scale is not None and (out.dim() != 2 or row_scale.shape != (out.shape[0],)):
        raise ValueError(f"row_scale of shape {tuple(row_scale.shape)} does not give each row of a "
                         f"{tuple(out.shape)} output one scale")
    codes = codes.view(torch.uint8).reshape(-1)
    n_out, per_program = out.numel(), 8 * WORDS
    rows, row_len = (row_scale, out.shape[1]) if row_scale is not None else (absmax, 1)  # rows unread without
    meta = {"BLOCKSIZE": blocksize, "OUT": _OUT[out.dtype], "ROW_SCALED": row_scale is not None, "num_warps": WARPS}
    whole = n_out // per_program if codes.data_ptr() % 4 == 0 else 0
    if whole:
        words = codes[: whole * per_program // 2].view(torch.int32)
        _dequant_words_kernel[(whole,)](words, absmax, table, out, rows, row_len, WORDS=WORDS, **meta)
    rest = triton.cdiv(n_out - whole * per_program, per_program)
    if rest:
        _dequant_bytes_kernel[(rest,)](codes, absmax, table, out, rows, row_len, n_out, whole,
                                       BYTES=per_program // 2, **meta)
    return out
