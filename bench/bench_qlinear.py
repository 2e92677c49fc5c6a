"""Where an NF4 layer's time goes at a QLoRA step's batch sizes, and what could take it out.

    PYTHONPATH=src python bench/bench_qlinear.py --out qlinear.json

The six linear layers of an OPT-175B decoder layer (q, k, v, out: 12288 -> 12288; fc1 12288 -> 49152;
fc2 49152 -> 12288), weights N(0, 0.02) quantized to NF4 by bitsandbytes (blocksize 64), inputs of
M rows in bf16 (M = 1024 and 4096: a batched-streams step of 1 x 512 and 4 x 512 tokens). Over a run
of LAYERS such layers (two distinct weight sets, alternating), the median time of:

- ``bnb``: bitsandbytes' own ``matmul_4bit`` (at these M on sm90: dequantize into a fresh bf16
  tensor, then F.linear), what a QLoRA forward runs today;
- ``serial``: the same two steps by hand, into buffers allocated beforehand, on one stream;
- ``dequant`` and ``gemm``: the dequantization alone (into buffers allocated beforehand) and the
  bf16 GEMMs alone (on weights dequantized beforehand);
- ``ahead``: the GEMMs of layer i on the main stream while a side stream dequantizes layer i + 1's
  weights into a second set of buffers (the same kernels, the same bits): whether the memory-bound
  dequantization hides under the compute-bound GEMMs;
- ``tinygemm``: torch's int4 weight-only GEMM (``aten._weight_int4pack_mm``, what torchao's int4
  weight-only layout runs on CUDA), group sizes 64 and 128, random codes and scales (its speed
  does not depend on the values);
- ``bnb_fused``: bitsandbytes' own fused 4-bit GEMM kernel (which its dispatch picks only for few rows
  on sm90), called directly;
- ``triton_fused``: a bench-only Triton GEMM that dequantizes the NF4 codes inside its K loop (the
  table value times the float32 absmax, rounded to bf16, as bitsandbytes does) and never writes a
  bf16 weight, over a few tile sizes; checked against bitsandbytes' dequantize-then-GEMM first
  (``--check`` runs that check alone; on a GPU: Triton's interpreter mishandles bf16 ``tl.dot``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as Fn
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import Recorder, environment, guarded, timed_ms  # noqa: E402

D, FFN, LAYERS = 12288, 49152, 8
SHAPES = [(D, D)] * 4 + [(FFN, D), (D, FFN)]  # (out, in) as nn.Linear holds them


def _inputs(m: int) -> dict[int, torch.Tensor]:
    return {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in {i for _, i in SHAPES}}


def _median(fn) -> float:
    return timed_ms(fn, torch.device("cuda"), 10, 2)["median_ms"]


def _nf4_layers():
    import bitsandbytes.functional as F

    layers = []
    for _ in range(2):
        layer = []
        for shape in SHAPES:
            w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
            layer.append(F.quantize_4bit(w, blocksize=64, quant_type="nf4"))
            del w
        layers.append(layer)
    return layers


def nf4_parts(m: int, layers) -> dict[str, float]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    x = _inputs(m)
    bufs = [[torch.empty(st.shape, device="cuda", dtype=torch.bfloat16) for _, st in layer] for layer in layers]
    side = torch.cuda.Stream()
    ready = [torch.cuda.Event() for _ in layers]
    done = [torch.cuda.Event() for _ in layers]

    def dequant(i):
        for (q, st), out in zip(layers[i % 2], bufs[i % 2]):
            F.dequantize_4bit(q, st, out=out)

    def gemms(i):
        for (_, st), w in zip(layers[i % 2], bufs[i % 2]):
            Fn.linear(x[st.shape[1]], w)

    def run_bnb():
        for i in range(LAYERS):
            for q, st in layers[i % 2]:
                bnb.matmul_4bit(x[st.shape[1]], q, quant_state=st)

    def run_serial():
        for i in range(LAYERS):
            dequant(i)
            gemms(i)

    def run_ahead():
        main = torch.cuda.current_stream()
        dequant(0)
        ready[0].record(main)
        for i in range(LAYERS):
            if i + 1 < LAYERS:
                with torch.cuda.stream(side):
                    if i >= 1:
                        side.wait_event(done[(i + 1) % 2])  # layer i - 1's GEMMs have read that set
                    dequant(i + 1)
                    ready[(i + 1) % 2].record(side)
            main.wait_event(ready[i % 2])
            gemms(i)
            done[i % 2].record(main)

    out = {"bnb_ms": _median(run_bnb), "serial_ms": _median(run_serial), "ahead_ms": _median(run_ahead),
           "dequant_ms": _median(lambda: [dequant(i) for i in range(LAYERS)]),
           "gemm_ms": _median(lambda: [gemms(i) for i in range(LAYERS)])}
    # the same bits either way: the last layer's outputs from the pipelined buffers
    ref = [bnb.matmul_4bit(x[st.shape[1]], q, quant_state=st) for q, st in layers[(LAYERS - 1) % 2]]
    run_ahead()
    torch.cuda.synchronize()
    got = [Fn.linear(x[st.shape[1]], w) for (_, st), w in zip(layers[(LAYERS - 1) % 2], bufs[(LAYERS - 1) % 2])]
    out["ahead_equals_bnb"] = all(torch.equal(a, b) for a, b in zip(ref, got))
    return {k: (v / LAYERS if k.endswith("_ms") else v) for k, v in out.items()}


def tinygemm(m: int, group: int) -> float:
    x = _inputs(m)
    weights = []
    for n, k in SHAPES:
        codes = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
        scales = torch.rand(k // group, n, 2, device="cuda", dtype=torch.bfloat16)
        weights.append((k, packed, scales))

    def run():
        for k, packed, scales in weights:
            torch.ops.aten._weight_int4pack_mm(x[k], packed, group, scales)

    return _median(run)


@triton.jit
def _nf4_matmul_kernel(x_ptr, codes_ptr, absmax_ptr, table_ptr, y_ptr, M, N, K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       W_FIRST: tl.constexpr, TABLE_LOADS: tl.constexpr):
    """y[M, N] = x[M, K] @ w[N, K].T, w NF4 in bitsandbytes' layout: weight i = n * K + k has its code
    in the high nibble of byte i // 2 when i is even, the low one when odd, and absmax i // 64. One
    K step (BLOCK_K = 64 or 128) is one or two absmax blocks: a row of the tile has one scale per 64. K is a
    constant (two values per layer): Triton's interpreter cannot loop to a run-time bound. With
    ``W_FIRST`` the tile is computed transposed (w @ x.T), the dequantized weight as the MMA's first
    operand, which Hopper's wgmma can read from registers rather than shared memory. With
    ``TABLE_LOADS`` each code's value is a load from the 16-entry table (cached) instead of a
    gather from registers."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n  # tiles of GROUP_M rows of tiles, column by column: x and w reused in L2
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    table = tl.broadcast_to(tl.load(table_ptr + tl.arange(0, 16))[None, :], (BLOCK_N, 16))
    acc = tl.zeros((BLOCK_N, BLOCK_M) if W_FIRST else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * K + k0 + tl.arange(0, BLOCK_K)[None, :], mask=m_ok[:, None], other=0.0)
        byte = tl.load(codes_ptr + rn[:, None] * (K // 2) + k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :],
                       mask=n_ok[:, None], other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + rn[:, None] * (K // 64) + k0 // 64 + tl.arange(0, BLOCK_K // 64)[None, :],
                        mask=n_ok[:, None], other=0.0)  # [BLOCK_N, BLOCK_K // 64]
        codes = tl.interleave(byte >> 4, byte & 15)  # [BLOCK_N, BLOCK_K]: even k in the high nibble
        value = tl.load(table_ptr + codes) if TABLE_LOADS else tl.gather(table, codes, 1)
        if BLOCK_K == 64:
            w = (value * scale).to(tl.bfloat16)
        else:
            w = tl.reshape(tl.reshape(value, (BLOCK_N, BLOCK_K // 64, 64)) * scale[:, :, None],
                           (BLOCK_N, BLOCK_K)).to(tl.bfloat16)
        if W_FIRST:
            acc += tl.dot(w, tl.trans(x))
        else:
            acc += tl.dot(x, tl.trans(w))
    if W_FIRST:
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(tl.bfloat16), mask=m_ok[None, :] & n_ok[:, None])
    else:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16), mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, warps, stages, w first, table loads, BLOCK_K), from four sweeps on an H200 at
# M = 1024: the fastest (the second, 11.0 ms a layer), the fastest two without the swap, table loads
# and 128-wide K steps (none faster; 256 x 128 with 3 stages needs more shared memory than the card has)
TILES = [(128, 128, 4, 4, False, False, 64), (256, 128, 8, 3, True, False, 64), (128, 128, 8, 3, True, False, 128),
         (256, 128, 8, 2, True, False, 128), (256, 64, 4, 3, True, False, 128), (128, 256, 8, 2, True, False, 128),
         (256, 128, 8, 3, False, False, 64), (256, 128, 8, 3, True, True, 64)]


def nf4_matmul(x, codes, absmax, table, n: int, tile=TILES[0]):
    m, k = x.shape
    bm, bn, warps, stages, w_first, loads, bk = tile
    if k % bk:
        raise ValueError(f"K = {k} is not a multiple of the K step {bk}")
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _nf4_matmul_kernel[grid](x, codes.view(torch.uint8).reshape(-1), absmax, table, y, m, n, k,
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, W_FIRST=w_first,
                             TABLE_LOADS=loads, num_warps=warps, num_stages=stages)
    return y


def check(device: str, shapes=((96, 256, 384), (64, 128, 256))) -> float:
    """The fused kernel (both operand orders) against bitsandbytes' dequantization then a float32 GEMM:
    the largest difference relative to the output's scale (bf16 rounding of y and of the K-sum order)."""
    import bitsandbytes.functional as F

    worst = 0.0
    for m, n, k in shapes:
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        w = torch.randn(n, k, device=device).to(torch.bfloat16) * 0.02
        codes, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        table = F.get_4bit_type("nf4", device=device).to(torch.float32)
        want = x.float() @ F.dequantize_4bit(codes, state).to(torch.bfloat16).float().T
        for tile in TILES[:3]:
            got = nf4_matmul(x, codes, state.absmax, table, n, tile).float()
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def tile_name(tile) -> str:
    return ("x".join(map(str, tile[:4])) + ("_w_first" if tile[4] else "") + ("_table_loads" if tile[5] else "")
            + f"_k{tile[6]}")


def triton_fused(x, layers, tile) -> float:
    import bitsandbytes.functional as F

    table = F.get_4bit_type("nf4", device="cuda").to(torch.float32)
    return _median(lambda: [nf4_matmul(x[st.shape[1]], q, st.absmax, table, st.shape[0], tile)
                            for i in range(LAYERS) for q, st in layers[i % 2]]) / LAYERS


def bnb_fused(x, layers) -> float:
    from bitsandbytes.backends.cuda import ops

    return _median(lambda: [ops._gemm_4bit_kernel_impl(x[st.shape[1]], q.view(-1, 1), st.shape, st.absmax, 64, "nf4",
                                                       None, None, None, None)
                            for i in range(LAYERS) for q, st in layers[i % 2]]) / LAYERS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--check", action="store_true", help="only check the fused kernel's numbers")
    args = ap.parse_args(argv)
    if args.check:
        print(json.dumps({"fused_vs_dequant_then_gemm_rel_err": check("cuda" if torch.cuda.is_available() else "cpu")}))
        return 0
    torch.manual_seed(0)
    rec = Recorder(args.out, environment(torch.device("cuda"), sys.argv[1:] if argv is None else argv,
                                         "bench_qlinear.py", ("triton", "bitsandbytes")))
    rec.put("setup", {"layers": LAYERS, "per": "layer", "fused_vs_dequant_then_gemm_rel_err": check("cuda")})
    flops = 2 * sum(n * k for n, k in SHAPES)
    layers = _nf4_layers()
    for m in args.rows:
        parts = nf4_parts(m, layers)
        rec.put(f"{m}_parts", {**parts, "gemm_TFLOPs": flops * m / parts["gemm_ms"] / 1e9})
        # each of these may fail on some card (no kernel, no room for a tile): recorded, the others still timed
        for group in (64, 128):
            guarded(rec, f"{m}_tinygemm_g{group}", lambda group=group: {"ms": tinygemm(m, group)})
        x = _inputs(m)
        guarded(rec, f"{m}_bnb_fused", lambda: {"ms": bnb_fused(x, layers)})
        for tile in TILES:
            guarded(rec, f"{m}_triton_{tile_name(tile)}", lambda tile=tile: {"ms": triton_fused(x, layers, tile)})
        del x
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
