"""Triton kernels for the ZO step on CUDA.

One pass over a parameter tensor does everything a step needs from it:

    read theta
    theta' = theta - lr (sum_j g_j z_j / q + wd theta)   (z_j regenerated in registers)
    round theta' to the parameter dtype (stochastically for bf16/fp16), write it back
    write theta' + a_i z_i and theta' + b_i z_i for each shadow seed i (the streams of the
    forward: two shadows of one seed for ZO-SGD, one shadow each of N seeds for FZOO)

With a threshold (Sparse MeZO) only elements with |theta| <= threshold take the step
(the mask of theta before it) or the perturbation (the mask of theta' after it); the
others keep their bits: one compare and select, no mask in memory.

So a step moves 8 bytes per bf16 parameter (read 2, write 2 + 2 + 2) instead of the
~74 of MeZO's four torch passes. Every z comes from the same counter-based
Philox4x32-10 stream as ``distzo.directions`` (the integer words are identical; the
float transform differs from the CPU's libm by at most a few 1e-6, see
``docs/kernels.md``), and the rounding follows ``distzo.update.stochastic_round``
exactly: with the same noise word, the same result.

Public functions (the kernel set that ``distzo.kernels.fused_for`` returns):
``update_and_shadows``, ``update_and_shadows_of``, ``update_and_shadows_grouped`` (one launch
over a ``Group`` of small tensors), ``apply_update``, plus ``normal``, ``uniform`` and
``raw_words`` for parity tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from distzo import directions
from distzo.records import UpdateRecord
from distzo.update import apply_update_, decays, perturbed

try:  # the CUDA libdevice wrappers (absent from the interpreter's view of the world)
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra import libdevice

# Under TRITON_INTERPRET=1 (CPU, for debugging) the MUFU approximations do not exist;
# the precise transform runs instead.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Box-Muller through the special-function unit (sin.approx/cos.approx/lg2.approx/
# sqrt.approx) rather than libdevice's software routines: |z - z_cpu| stays below 1e-5
# (tests/test_kernels.py checks it) and the update + shadow pass runs 1.7x faster (the
# pass is bound by instruction throughput, not memory; docs/kernels.md).
FAST_MATH = not _INTERPRET
_INTERPRET_C = tl.constexpr(_INTERPRET)
_MUL_M0 = tl.constexpr("{ .reg .b64 t; mul.wide.u32 t, $2, 0xD2511F53; mov.b64 {$0, $1}, t; }")
_MUL_M1 = tl.constexpr("{ .reg .b64 t; mul.wide.u32 t, $2, 0xCD9E8D57; mov.b64 {$0, $1}, t; }")

_BLOCK = 1024  # elements per program: 16 per thread with 2 warps (two 16-byte bf16 vectors)
_WARPS = 2
_MASK32 = 0xFFFFFFFF

_SR_NONE, _SR_BF16, _SR_GENERIC = 0, 1, 2
# the KIND constexpr of the kernels: how a Philox block becomes z (directions.py)
_KINDS = {"gaussian": 0, "rademacher": 1, "rademacher-packed": 2, "rademacher-shared": 3}
# rademacher-shared: a pass writing the shadows of more seeds than this draws their families afresh
# instead of carrying the update's words on. Compiled for sm_90 (bench/kernel_sass.py), carrying
# them through FZOO's 8 shadows takes 128 registers a thread against 80; momentum's record with its
# two shadows takes 96 carrying them against 255 without.
_CARRY_SHADOWS = tl.constexpr(2)
_FAMILY = tl.constexpr(0xFFFFFFE0)  # a rademacher-shared seed's low word without its lane (directions.family)


# --------------------------------------------------------------------------- device code


@triton.jit
def _mul_wide(a, M: tl.constexpr, ASM: tl.constexpr, TEXT: tl.constexpr):
    """(low, high) words of the 64-bit product a * M (a uint32); TEXT is the same in PTX."""
    if ASM:  # one widening multiply (IMAD.WIDE.U32) instead of IMAD.HI + IMAD
        lo, hi = tl.inline_asm_elementwise(
            TEXT,
            "=r,=r,r", [a], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1,
        )
        return lo, hi
    else:
        return a * M, tl.umulhi(a, M)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1, ASM: tl.constexpr):
    """Philox4x32-10 on uint32 values (Salmon et al., SC'11); same round as directions.philox4x32."""
    for _ in tl.static_range(10):
        lo0, hi0 = _mul_wide(c0, 0xD2511F53, ASM, _MUL_M0)
        lo1, hi1 = _mul_wide(c2, 0xCD9E8D57, ASM, _MUL_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _u32(x):
    """An int32 kernel argument holding the bit pattern of a uint32."""
    return x.to(tl.uint32, bitcast=True)


@triton.jit
def _block_words(blk, key_lo, key_hi, seed_lo, seed_hi):
    """The four Philox words of each block index in ``blk`` (int64) under (seed, key)."""
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    return _philox(c0, c1, key_lo, key_hi, seed_lo, seed_hi, not _INTERPRET_C)


@triton.jit
def _interleave(a0, a1, a2, a3, BLOCK: tl.constexpr):
    """Lanes (a_k[b] = element 4b + k) -> one vector in element order."""
    return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [BLOCK])


@triton.jit
def _block_index(BLOCK: tl.constexpr):
    """0 .. BLOCK/4 - 1, derived from the element range so that the compiler gives each
    thread the Philox blocks of the elements it loads (no shuffles when interleaving)."""
    lanes = tl.reshape(tl.arange(0, BLOCK), [BLOCK // 4, 2, 2])
    even, _ = tl.split(lanes)
    first, _ = tl.split(even)
    return first >> 2


@triton.jit
def _unit(w):
    """Exact float32 in (0, 1) from a uint32 word: ((w >> 9) * 2 + 1) * 2^-24, formed as
    (1 + (w >> 9) 2^-23) - (1 - 2^-24): the first term is w's top 23 bits under 1.0's exponent, and
    the subtraction is exact (Sterbenz: the operands are within a factor of 2)."""
    return ((w >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 0.999999940395355224609375


@triton.jit
def _box_muller(wa, wb, FAST: tl.constexpr):
    """Two normals from two words, as directions._gaussian_from_blocks computes them."""
    ua = _unit(wa)
    t = _unit(wb) * 6.2831854820251465
    if FAST:
        # lg2.approx has an absolute (not relative) error near 1, where -2 ln u is
        # tiny; there, with v = 1 - u exact, -ln u = v + v^2/2 + v^3/3 + v^4/4 + O(v^5).
        v = 1.0 - ua
        series = v * (1.0 + v * (0.5 + v * (0.3333333432674408 + v * 0.25)))
        minus_ln = tl.where(v < 0.015625, series, -0.6931471805599453 * libdevice.fast_log2f(ua))
        r = tl.sqrt(2.0 * minus_ln)
        return r * libdevice.fast_cosf(t), r * libdevice.fast_sinf(t)
    else:
        r = tl.sqrt_rn(tl.log(ua) * -2.0)
        return r * tl.cos(t), r * tl.sin(t)


@triton.jit
def _run_starts(BLOCK: tl.constexpr):
    """0, 8, .., BLOCK - 8: the first element of each 8-element run, derived from the element range
    (as ``_block_index`` is) so that each thread gets the runs of the elements it loads (8 bf16
    values are one 16-byte vector)."""
    lanes = tl.reshape(tl.arange(0, BLOCK), [BLOCK // 8, 2, 2, 2])
    a, _ = tl.split(lanes)
    b, _ = tl.split(a)
    first, _ = tl.split(b)
    return first


@triton.jit
def _sign_bit(w, J: tl.constexpr):
    """Bit J of w moved to the float sign position: 0x80000000 where z = -1, 0 where z = +1."""
    return (w << (31 - J)) & 0x80000000


# Bits J and J + 4, then J + 2, of each run's word, joined so that the last reshape puts bit j at
# element (run start + j): a join adds a trailing axis, so the first join splits on bit 2 of j.
@triton.jit
def _bits1(w, J: tl.constexpr):
    return tl.join(_sign_bit(w, J), _sign_bit(w, J + 4))


@triton.jit
def _bits2(w, J: tl.constexpr):
    return tl.join(_bits1(w, J), _bits1(w, J + 2))


@triton.jit
def _packed_masks(base, key_lo, key_hi, seed_lo, seed_hi, BLOCK: tl.constexpr):
    """rademacher-packed signs of elements base .. base + BLOCK - 1 (base a multiple of 128) as sign
    masks (``_sign_masks``): element i is bit i % 32 of word (i // 32) % 4 of block i // 128, so an
    8-element run takes 8 consecutive bits of one word, and a thread computes one Philox block per
    run of its elements (rademacher: one per 4 elements)."""
    tl.static_assert(BLOCK % 128 == 0)
    e = _run_starts(BLOCK)
    w0, w1, w2, w3 = _block_words((base + e) >> 7, key_lo, key_hi, seed_lo, seed_hi)
    lane = (e >> 5) & 3
    w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    w = w >> (e & 24).to(tl.uint32)  # the run's bits at the bottom
    return tl.reshape(tl.join(_bits2(w, 0), _bits2(w, 1)), [BLOCK])


@triton.jit
def _lane_masks(w0, w1, w2, w3, seed_lo, BLOCK: tl.constexpr):
    """rademacher-shared signs of a seed from its family's words: bit 31 - lane of each word."""
    lane = seed_lo & 31
    return _interleave((w0 << lane) & 0x80000000, (w1 << lane) & 0x80000000, (w2 << lane) & 0x80000000,
                       (w3 << lane) & 0x80000000, BLOCK)


@triton.jit
def _no_family(blk):
    """A family state (the family's two halves, its four words) of a family no seed has (a low word
    with a lane bit set), so that the first seed a pass draws draws its family's words."""
    zero = (blk & 0).to(tl.uint32)
    return tl.full([], 1, tl.uint32), tl.full([], 0, tl.uint32), zero, zero, zero, zero


@triton.jit
def _shared_masks(blk, key_lo, key_hi, seed_lo, seed_hi, fam, BLOCK: tl.constexpr):
    """(rademacher-shared signs of a seed, the family state ``fam`` moved to its family). The words
    are drawn only when the seed's family is not ``fam``'s, so consecutive lanes of one family (a
    step's probes, a momentum window, a step's update and its next probes) share one Philox block
    per four elements. The test is uniform over the program."""
    fam_lo, fam_hi, w0, w1, w2, w3 = fam
    lo = seed_lo & _FAMILY
    if (lo != fam_lo) | (seed_hi != fam_hi):
        w0, w1, w2, w3 = _block_words(blk, key_lo, key_hi, lo, seed_hi)
    return _lane_masks(w0, w1, w2, w3, seed_lo, BLOCK), (lo, seed_hi, w0, w1, w2, w3)


@triton.jit
def _sign_masks(blk, base, key_lo, key_hi, seed_lo, seed_hi, BLOCK: tl.constexpr, KIND: tl.constexpr):
    """The sign kinds' z as masks of the float sign bit (uint32, element order): a product g z with
    z = +-1 is g with that bit flipped, exactly what g * z rounds to, at one logic op instead of a
    conversion and a multiply."""
    if KIND == 2:
        return _packed_masks(base, key_lo, key_hi, seed_lo, seed_hi, BLOCK)
    elif KIND == 3:
        w0, w1, w2, w3 = _block_words(blk, key_lo, key_hi, seed_lo & _FAMILY, seed_hi)
        return _lane_masks(w0, w1, w2, w3, seed_lo, BLOCK)
    else:
        w0, w1, w2, w3 = _block_words(blk, key_lo, key_hi, seed_lo, seed_hi)
        return _interleave(w0 & 0x80000000, w1 & 0x80000000, w2 & 0x80000000, w3 & 0x80000000, BLOCK)


@triton.jit
def _flip(v, masks):
    """v * z for the sign kinds' z (``_sign_masks``): v with its sign flipped where z = -1."""
    return (v.to(tl.uint32, bitcast=True) ^ masks).to(tl.float32, bitcast=True)


@triton.jit
def _scaled(a, z, KIND: tl.constexpr):
    """a z, for z as ``_factor`` gives it: floats for gaussian, sign masks for the sign kinds."""
    if KIND == 0:
        return a * z
    else:
        return _flip(a, z)


@triton.jit
def _factor(blk, base, key_lo, key_hi, seed_lo, seed_hi, BLOCK: tl.constexpr, KIND: tl.constexpr,
            FAST: tl.constexpr):
    """z in the form the step kernel multiplies by (``_scaled``): floats for gaussian, sign masks
    for the sign kinds."""
    if KIND == 0:
        return _direction(blk, base, key_lo, key_hi, seed_lo, seed_hi, BLOCK, KIND, FAST)
    else:
        return _sign_masks(blk, base, key_lo, key_hi, seed_lo, seed_hi, BLOCK, KIND)


@triton.jit
def _direction(blk, base, key_lo, key_hi, seed_lo, seed_hi, BLOCK: tl.constexpr, KIND: tl.constexpr,
               FAST: tl.constexpr):
    """z(seed, key, i) for the BLOCK elements from ``base`` (the blocks ``blk`` of four), float32,
    element order; KIND as ``_KINDS``."""
    if KIND == 0:
        w0, w1, w2, w3 = _block_words(blk, key_lo, key_hi, seed_lo, seed_hi)
        # Box-Muller on (nblocks, 2) pairs: column 0 pairs words (0, 1), column 1 words (2, 3).
        c, s = _box_muller(tl.join(w0, w2), tl.join(w1, w3), FAST)
        return tl.reshape(tl.join(c, s), [BLOCK])
    else:
        return _flip(tl.full([BLOCK], 1.0, tl.float32), _sign_masks(blk, base, key_lo, key_hi, seed_lo, seed_hi,
                                                                    BLOCK, KIND))


@triton.jit
def _noise(blk, key_lo, key_hi, seed_lo, seed_hi, BLOCK: tl.constexpr):
    """The rounding noise as k = word >> 9 (u = (2k + 1) 2^-24), uint32, element order."""
    w0, w1, w2, w3 = _block_words(blk, key_lo, key_hi, seed_lo, seed_hi)
    return _interleave(w0 >> 9, w1 >> 9, w2 >> 9, w3 >> 9, BLOCK)


@triton.jit
def _round_bf16(x, k):
    """update.stochastic_round to bfloat16, in integers.

    With T the truncation of |x| to bf16 and f its 16 dropped bits, |x - nearest| / gap
    is d / 2^16 with d = f (nearest = T) or 2^16 - f (nearest = T + ulp) exactly, and
    u < d / 2^16  <=>  2k + 1 < 256 d  <=>  k < 128 d.
    """
    nearest = x.to(tl.bfloat16)
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    mag = bits & 0x7FFFFFFF
    low = mag & 0xFFFF0000
    frac = mag & 0xFFFF
    nmag = nearest.to(tl.float32).to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    up = nmag != low
    d = tl.where(up, 0x10000 - frac, frac)
    other = tl.where(up, low, low + 0x10000)
    # inf/NaN results stay as rounding to nearest made them (the float rule's NaN compare).
    take = (k < (d << 7)) & (nmag < 0x7F800000)
    other_val = (sign | other).to(tl.float32, bitcast=True).to(tl.bfloat16)
    return tl.where(take, other_val, nearest)


@triton.jit
def _round_generic(x, k, DTYPE: tl.constexpr, ITYPE: tl.constexpr, SIGN: tl.constexpr):
    """update.stochastic_round to a 16-bit float type, as floats (used for float16)."""
    nearest = x.to(DTYPE)
    near32 = nearest.to(tl.float32)
    err = x - near32
    nb = nearest.to(ITYPE, bitcast=True)
    zero = (nb.to(tl.int32) & (-SIGN - 1)) == 0
    away = (err > 0) == (near32 > 0)
    step = tl.where(away, nb.to(tl.int32) + 1, nb.to(tl.int32) - 1)
    tiny = tl.where(err < 0, SIGN | 1, 1)
    other = tl.where(zero, tiny, step).to(ITYPE).to(DTYPE, bitcast=True)
    gap = tl.abs(other.to(tl.float32) - near32)
    prob = tl.div_rn(tl.abs(err), gap)
    u = (k * 2 + 1).to(tl.float32) * 5.9604644775390625e-08
    return tl.where((err != 0) & (gap > 0) & (u < prob), other, nearest)


@triton.jit
def _seed_halves(seeds_ptr, i):
    """Element i of the int64 seed buffer as the (low, high) uint32 words Philox takes."""
    s = tl.load(seeds_ptr + i)
    return (s & 0xFFFFFFFF).to(tl.uint32), ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _sum_directions(blk, base, klo, khi, useeds_ptr, coef_ptr, fam, FIRST: tl.constexpr, COUNT: tl.constexpr,
                    BLOCK: tl.constexpr, KIND: tl.constexpr, FAST: tl.constexpr):
    """(sum_j c_j z(s_j) over the record's directions j in [FIRST, FIRST + COUNT), in order; the
    rademacher-shared family state after them, from ``fam`` before)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(FIRST, FIRST + COUNT):
        slo, shi = _seed_halves(useeds_ptr, j)
        g = tl.load(coef_ptr + j)
        if KIND == 3:
            masks, fam = _shared_masks(blk, klo, khi, slo, shi, fam, BLOCK)
            acc += _flip(g, masks)
        else:
            acc += _scaled(g, _factor(blk, base, klo, khi, slo, shi, BLOCK, KIND, FAST), KIND)
    return acc, fam


@triton.jit
def _adam_step(blk, base, klo, khi, useeds_ptr, coef_ptr, fam, Q: tl.constexpr, G: tl.constexpr, W: tl.constexpr,
               BLOCK: tl.constexpr, KIND: tl.constexpr, FAST: tl.constexpr):
    """(m / (sqrt(v) + delta) over G groups of Q / G directions, as update._adam_step orders it:
    d_g = sum of the group's c_j z_j, m += w1_g d_g, v += w2_g d_g^2 (the pairs at coef W + 2g,
    delta at W + 2G), with a correctly rounded square root and division; the family state after)."""
    m = tl.zeros([BLOCK], tl.float32)
    v = tl.zeros([BLOCK], tl.float32)
    for gi in tl.static_range(G):
        d, fam = _sum_directions(blk, base, klo, khi, useeds_ptr, coef_ptr, fam, gi * (Q // G), Q // G, BLOCK,
                                 KIND, FAST)
        m += tl.load(coef_ptr + W + 2 * gi) * d
        v += tl.load(coef_ptr + W + 2 * gi + 1) * d * d
    return tl.div_rn(m, tl.sqrt_rn(v) + tl.load(coef_ptr + W + 2 * G)), fam


@triton.jit
def _shadow_ptr(out_ptr, length, k: tl.constexpr, NDIV: tl.constexpr):
    """Where shadow k starts: k * n elements into the output, a multiple of NDIV."""
    return out_ptr + tl.multiple_of(length * k, NDIV)


@triton.jit(do_not_specialize=["key_lo", "key_hi"])
def _step_kernel(
    p_ptr, out_ptr, n,
    key_lo, key_hi,
    useeds_ptr, coef_ptr, thr,
    Q: tl.constexpr, DIV: tl.constexpr, UPDATE: tl.constexpr, DECAY: tl.constexpr, SR: tl.constexpr,
    NS: tl.constexpr, PLUS: tl.constexpr, MINUS: tl.constexpr, KIND: tl.constexpr, FAST: tl.constexpr,
    MASKED: tl.constexpr, NDIV: tl.constexpr, ADAM: tl.constexpr, BLOCK: tl.constexpr,
):
    # useeds_ptr (int64): the update's seeds s_0 .. s_{Q-1}, the rounding seed, the NS shadow
    # seeds; coef_ptr (float32): g_0 .. g_{Q-1}, lr, weight decay, then scale+ and scale- of each
    # shadow seed; thr (float32): the mask threshold, read only when MASKED. Everything that
    # changes from step to step is in device memory, so a captured CUDA graph replays with the
    # next step's values. out_ptr holds the shadows one after another, n elements each: seed i's
    # plus shadow (PLUS), then its minus shadow (MINUS); NDIV divides n (a multiple of 16 at most),
    # so the compiler knows every shadow starts as aligned as the first. ADAM > 0: an Adam-like
    # record of ADAM step groups of Q / ADAM seeds each, whose (w1, w2) pairs and delta follow
    # the shadows' scales in coef_ptr; the step is m / (sqrt(v) + delta) (update._adam_step).
    _step_block(p_ptr, out_ptr, n, tl.program_id(0).to(tl.int64) * BLOCK, _u32(key_lo), _u32(key_hi),
                useeds_ptr, coef_ptr, thr, True,
                Q, DIV, UPDATE, DECAY, SR, NS, PLUS, MINUS, KIND, FAST, MASKED, NDIV, ADAM, BLOCK)


# The table of a grouped launch (int64, T entries per row, T a power of two): the first program of
# each tensor (unused entries past the last program), theta's offset from the base pointer and the
# elements of the tensors before it (multiples of 16; its shadows start that many times the number
# of shadows into the output), the length (a multiple of 16), the direction key, and whether weight
# decay applies.
_ROWS = ("start", "theta", "out", "n", "key", "decays")


@triton.jit
def _step_grouped_kernel(
    p_ptr, out_ptr, table_ptr, useeds_ptr, coef_ptr,
    T: tl.constexpr,
    Q: tl.constexpr, DIV: tl.constexpr, UPDATE: tl.constexpr, DECAY: tl.constexpr, SR: tl.constexpr,
    NS: tl.constexpr, PLUS: tl.constexpr, MINUS: tl.constexpr, KIND: tl.constexpr, FAST: tl.constexpr,
    ADAM: tl.constexpr, BLOCK: tl.constexpr,
):
    # One launch over the tensors of a unit call, each exactly as _step_kernel would pass over it
    # alone (same blocks, same words, same arithmetic): a program finds its tensor in the table and
    # runs that tensor's block. Unmasked only; every length a multiple of 16.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.sum((tl.load(table_ptr + tl.arange(0, T)) <= pid).to(tl.int32)) - 1
    theta_at = tl.multiple_of(tl.load(table_ptr + T + t), 16)
    # each tensor's NS * (PLUS + MINUS) shadows lie together, n elements each, after the previous tensor's
    out_at = tl.multiple_of(tl.load(table_ptr + 2 * T + t) * (NS * (PLUS + MINUS)), 16)
    n = tl.multiple_of(tl.load(table_ptr + 3 * T + t), 16)
    key = tl.load(table_ptr + 4 * T + t)
    decays = tl.load(table_ptr + 5 * T + t) != 0
    base = (pid - tl.load(table_ptr + t)) * BLOCK
    klo = (key & 0xFFFFFFFF).to(tl.uint32)
    khi = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    _step_block(p_ptr + theta_at, out_ptr + out_at, n, base, klo, khi, useeds_ptr, coef_ptr, 0.0, decays,
                Q, DIV, UPDATE, DECAY, SR, NS, PLUS, MINUS, KIND, FAST, False, 16, ADAM, BLOCK)


@triton.jit
def _step_block(
    p_ptr, out_ptr, n, base, klo, khi, useeds_ptr, coef_ptr, thr, decays,
    Q: tl.constexpr, DIV: tl.constexpr, UPDATE: tl.constexpr, DECAY: tl.constexpr, SR: tl.constexpr,
    NS: tl.constexpr, PLUS: tl.constexpr, MINUS: tl.constexpr, KIND: tl.constexpr, FAST: tl.constexpr,
    MASKED: tl.constexpr, NDIV: tl.constexpr, ADAM: tl.constexpr, BLOCK: tl.constexpr,
):
    """The fused pass over elements [base, base + BLOCK) of one tensor of n elements (key (klo, khi)):
    ``_step_kernel``'s arguments, with the decay taken only where ``decays`` (a grouped launch's
    tensors differ in it)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n - base
    blk = (base >> 2) + _block_index(BLOCK)
    theta = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
    x = theta.to(tl.float32)
    fam = _no_family(blk)  # rademacher-shared: the update and the shadows draw a family's words once
    if UPDATE:
        if ADAM == 0:
            acc, fam = _sum_directions(blk, base, klo, khi, useeds_ptr, coef_ptr, fam, 0, Q, BLOCK, KIND, FAST)
            if DIV > 1:  # the record's divisor, as a separate correctly rounded division (MeZO's order)
                acc = tl.div_rn(acc, tl.full([BLOCK], DIV, tl.float32))
        else:
            acc, fam = _adam_step(blk, base, klo, khi, useeds_ptr, coef_ptr, fam, Q, ADAM, Q + 2 + 2 * NS, BLOCK,
                                  KIND, FAST)
        if DECAY:
            acc = tl.where(decays, acc + tl.load(coef_ptr + Q + 1) * x, acc)
        if MASKED:  # x is theta before the update; a zero step keeps theta's bits (update.apply_update_)
            acc = tl.where(tl.abs(x) <= thr, acc, 0.0)
        x = x - tl.load(coef_ptr + Q) * acc
        if SR == 1:
            sr_lo, sr_hi = _seed_halves(useeds_ptr, Q)
            theta = _round_bf16(x, _noise(blk, klo, khi, sr_lo, sr_hi, BLOCK))
        elif SR == 2:
            sr_lo, sr_hi = _seed_halves(useeds_ptr, Q)
            k = _noise(blk, klo, khi, sr_lo, sr_hi, BLOCK)
            theta = _round_generic(x, k, tl.float16, tl.int16, -32768)
        else:
            theta = x.to(theta.dtype)
        tl.store(p_ptr + base + offs, theta, mask=mask)
        x = theta.to(tl.float32)
    if PLUS or MINUS:
        length = tl.zeros([], tl.int64) + n  # the shadows' offsets in 64 bits: NS * n may pass 2^31
        if NS > _CARRY_SHADOWS:
            fam = _no_family(blk)
        for i in tl.static_range(NS):
            ds_lo, ds_hi = _seed_halves(useeds_ptr, Q + 1 + i)
            if KIND == 3:
                z, fam = _shared_masks(blk, klo, khi, ds_lo, ds_hi, fam, BLOCK)
            else:
                z = _factor(blk, base, klo, khi, ds_lo, ds_hi, BLOCK, KIND, FAST)
            if PLUS:
                plus = (x + _scaled(tl.load(coef_ptr + Q + 2 + 2 * i), z, KIND)).to(theta.dtype)
                if MASKED:  # x is theta after the update (update.perturbed)
                    plus = tl.where(tl.abs(x) <= thr, plus, theta)
                tl.store(_shadow_ptr(out_ptr, length, i * (PLUS + MINUS), NDIV) + base + offs, plus, mask=mask)
            if MINUS:
                minus = (x + _scaled(tl.load(coef_ptr + Q + 3 + 2 * i), z, KIND)).to(theta.dtype)
                if MASKED:
                    minus = tl.where(tl.abs(x) <= thr, minus, theta)
                tl.store(_shadow_ptr(out_ptr, length, i * (PLUS + MINUS) + PLUS, NDIV) + base + offs, minus,
                         mask=mask)


@triton.jit(do_not_specialize=["key_lo", "key_hi", "seed_lo", "seed_hi"])
def _draw_kernel(
    out_ptr, n, first_block, key_lo, key_hi, seed_lo, seed_hi,
    WHAT: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """Elements [4 first_block, 4 first_block + n) as z (WHAT 0 gaussian, 1 rademacher,
    4 rademacher-packed: then 4 first_block is a multiple of 128, 5 rademacher-shared), uniforms (2)
    or raw words as int64 (3)."""
    pid = tl.program_id(0).to(tl.int64)
    base = pid * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < n - base
    blk = first_block + pid * (BLOCK // 4) + _block_index(BLOCK)
    klo = _u32(key_lo)
    khi = _u32(key_hi)
    slo = _u32(seed_lo)
    shi = _u32(seed_hi)
    if WHAT == 4:
        out = _direction(blk, first_block.to(tl.int64) * 4 + base, klo, khi, slo, shi, BLOCK, 2, FAST)
    elif WHAT < 2:
        out = _direction(blk, base, klo, khi, slo, shi, BLOCK, WHAT, FAST)
    elif WHAT == 5:
        out = _direction(blk, base, klo, khi, slo, shi, BLOCK, 3, FAST)
    else:
        w0, w1, w2, w3 = _block_words(blk, klo, khi, slo, shi)
        if WHAT == 2:
            out = _interleave(_unit(w0), _unit(w1), _unit(w2), _unit(w3), BLOCK)
        else:
            out = _interleave(w0.to(tl.int64), w1.to(tl.int64), w2.to(tl.int64), w3.to(tl.int64), BLOCK)
    tl.store(out_ptr + base + offs, out, mask=mask)


# --------------------------------------------------------------------------- host side


def _halves(value: int) -> tuple[int, int]:
    """A 64-bit value as two int32 arguments carrying the bit patterns of its uint32 halves."""
    value &= 0xFFFF_FFFF_FFFF_FFFF
    lo, hi = value & _MASK32, value >> 32
    return lo - (1 << 32) if lo >> 31 else lo, hi - (1 << 32) if hi >> 31 else hi


def _grid(n: int) -> tuple[int]:
    return (max(1, triton.cdiv(n, _BLOCK)),)


def _kind(kind: str) -> int:
    directions.check_kind(kind)
    return _KINDS[kind]


_SR_MODES = {torch.bfloat16: _SR_BF16, torch.float16: _SR_GENERIC, torch.float32: _SR_NONE}


# Shadow seeds one launch writes at most (FZOO's N probes): more take further launches.
MAX_SHADOW_SEEDS = 16


class LaunchArgs:
    """Everything a launch needs besides the tensor: the seeds (update seeds, rounding seed,
    the shadows' direction seeds) and the coefficients / lr / decay / scales in two small
    device buffers, uploaded once per step, not per tensor, and the constexpr flags.

    ``seeds`` are the shadow seeds and ``scales`` one (a, b) pair per seed. ``refresh`` writes
    another step's values into the same buffers (the flags and the number of seeds must agree:
    ``layout``, ``shadow_seeds``), so a kernel captured in a CUDA graph reads them at its next
    replay. The copy runs on the current stream, after every launch that read the old values."""

    def __init__(self, record: UpdateRecord | None, kind, seeds: Sequence[int], scales: Sequence[tuple[float, float]],
                 device):
        self.layout = layout_of(record, kind)
        self.q, self.div, self.has_update, self.decay, self.kind, self.groups = self.layout
        self.shadow_seeds = _check_shadows(seeds, scales)
        seed_values, coefs = _values(record, seeds, scales, self.has_update)
        self.seeds_t = torch.tensor(seed_values, dtype=torch.int64).to(device, non_blocking=True)
        self.coef_t = torch.tensor(coefs, dtype=torch.float32).to(device, non_blocking=True)
        self.aligned = _aligned(self.seeds_t) and _aligned(self.coef_t)
        self.serial = 0  # which forward the keeper last refreshed these for (distzo.optimizer)

    def refresh(self, record: UpdateRecord | None, kind, seeds: Sequence[int],
                scales: Sequence[tuple[float, float]]) -> None:
        fresh = layout_of(record, kind)
        if fresh != self.layout:
            raise ValueError(f"launch arguments of layout {self.layout} cannot take a record of layout {fresh}")
        if _check_shadows(seeds, scales) != self.shadow_seeds:
            raise ValueError(f"launch arguments of {self.shadow_seeds} shadow seeds cannot take {len(seeds)}")
        seeds, coefs = _values(record, seeds, scales, self.has_update)
        # pinned sources: the copies are asynchronous, and the caching host allocator keeps each
        # source alive until its copy has run
        self.seeds_t.copy_(torch.tensor(seeds, dtype=torch.int64).pin_memory(), non_blocking=True)
        self.coef_t.copy_(torch.tensor(coefs, dtype=torch.float32).pin_memory(), non_blocking=True)


def layout_of(record: UpdateRecord | None, kind) -> tuple:
    """The constexpr flags a record's launches compile with (``LaunchArgs.layout``): seeds, divisor,
    update, decay, kind, and an Adam-like record's number of step groups (0 for a linear one)."""
    has_update = record is not None and len(record.seeds) > 0
    if not has_update:
        return 1, 1, False, False, _kind(kind), 0
    groups = 0 if record.adam is None else len(record.adam)
    return max(len(record.seeds), 1), record.divisor, True, bool(record.decay), _kind(kind), groups


def _signed(value: int) -> int:
    value &= 0xFFFF_FFFF_FFFF_FFFF
    return value - (1 << 64) if value >> 63 else value


def _check_shadows(seeds: Sequence[int], scales: Sequence[tuple[float, float]]) -> int:
    """The number of shadow seeds, after checking that each has its (a, b) pair."""
    if not 1 <= len(seeds) <= MAX_SHADOW_SEEDS or len(scales) != len(seeds) or any(len(p) != 2 for p in scales):
        raise ValueError(f"a launch takes 1 to {MAX_SHADOW_SEEDS} shadow seeds, each with an (a, b) pair of scales; "
                         f"got {len(seeds)} seeds and {len(scales)} pairs")
    return len(seeds)


def _values(record: UpdateRecord | None, seeds: Sequence[int], scales: Sequence[tuple[float, float]],
            has_update: bool) -> tuple[list[int], list[float]]:
    """The two buffers' contents: [s_0 .. s_{Q-1}, rounding seed, shadow seeds...] and
    [c_0 .. c_{Q-1}, lr, decay, a_0, b_0, a_1, b_1, ...] (with Q = max(q, 1)), then for an Adam-like
    record [w1_0, w2_0, w1_1, w2_1, ..., delta]."""
    update_seeds = [_signed(s) for s in record.seeds] if has_update else [0]
    rounding = _signed(record.rounding_seed) if has_update else 0
    coeffs = list(record.coeffs) if has_update else [0.0]
    lr = record.lr if has_update else 0.0
    decay = record.decay if has_update else 0.0
    pairs = [float(v) for pair in scales for v in pair]
    adam = [] if not has_update or record.adam is None else [
        *(float(w) for _, w1, w2 in record.adam for w in (w1, w2)), record.delta]
    return [*update_seeds, rounding, *(_signed(s) for s in seeds)], [*coeffs, lr, decay, *pairs, *adam]


_SCALARS: dict[tuple, LaunchArgs] = {}


def _scalars(record: UpdateRecord | None, kind, seeds: Sequence[int], scales: Sequence[tuple[float, float]],
             device) -> LaunchArgs:
    ident = (record, kind, tuple(seeds), tuple(tuple(p) for p in scales), device)
    hit = _SCALARS.get(ident)
    if hit is None:
        if len(_SCALARS) >= 8:
            _SCALARS.pop(next(iter(_SCALARS)))
        hit = _SCALARS[ident] = LaunchArgs(record, kind, seeds, scales, device)
    return hit


def _direct_launch_supported() -> bool:
    """Whether compiled kernels can be launched without the JIT's per-call binding.

    A step launches one kernel per parameter tensor, ~400 for a 7B model, and the JIT's
    argument binding and cache lookup cost tens of microseconds each: on short batches
    the host, not the GPU, would set the pace. The compiled kernel's launcher is called
    the way ``JITFunction.run`` calls it; that calling convention is checked for the
    Triton releases listed here, and other releases take the ordinary path.
    """
    if os.environ.get("DISTZO_TRITON_DIRECT_LAUNCH", "1") == "0" or _INTERPRET:
        return False
    return tuple(int(v) for v in triton.__version__.split(".")[:2]) == (3, 6)


_DIRECT = _direct_launch_supported()
_COMPILED: dict[tuple, object] = {}
_STEP_CONSTS = ("Q", "DIV", "UPDATE", "DECAY", "SR", "NS", "PLUS", "MINUS", "KIND", "FAST", "MASKED", "NDIV",
                "ADAM", "BLOCK")
_GROUPED_CONSTS = ("T", "Q", "DIV", "UPDATE", "DECAY", "SR", "NS", "PLUS", "MINUS", "KIND", "FAST", "ADAM", "BLOCK")


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _hooks_active() -> bool:
    """Whether launch hooks are registered (e.g. by a profiler): then launch the JIT's way."""
    runtime = triton.knobs.runtime
    return any(h is not None and bool(getattr(h, "calls", True))
               for h in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def _on_device(index):
    """Make ``index`` the current device for a launch (a no-op when it already is)."""
    if index is None or index < 0 or torch.cuda.current_device() == index:
        return contextlib.nullcontext()
    return torch.cuda.device(index)


def _launch(work, out, plus: bool, minus: bool, key, sc: LaunchArgs, decay: bool,
            threshold: float | None = None) -> None:
    """One fused pass over the contiguous tensor ``work``, its shadows into ``out`` (for each of
    the launch's shadow seeds, a plus shadow if ``plus``, then a minus shadow if ``minus``, n
    elements each), masked by ``threshold`` (None: unmasked).

    Triton reads only data pointers, so no tensor needs reshaping; the JIT specialises on
    whether ``work`` and ``out`` start on a 16-byte boundary (and so does the launch cache).
    """
    n = work.numel()
    if n == 0:
        return
    key_lo, key_hi = _halves(key)
    out = work if out is None else out
    args = (work, out, n, key_lo, key_hi, sc.seeds_t, sc.coef_t, 0.0 if threshold is None else float(threshold))
    consts = (sc.q, sc.div, sc.has_update, decay, _SR_MODES[work.dtype], sc.shadow_seeds, plus, minus,
              sc.kind, FAST_MATH, threshold is not None, math.gcd(n, 16), sc.groups, _BLOCK)
    grid0 = triton.cdiv(n, _BLOCK)
    device = work.get_device()
    aligned = (work.data_ptr() % 16 == 0, out.data_ptr() % 16 == 0)
    spec = (device, work.dtype, n >= 1 << 31, n % 16 == 0, n == 1, aligned, sc.aligned, _WARPS, consts)
    _run(_step_kernel, _STEP_CONSTS, grid0, spec, args, consts, device)


def _run(fn, names: tuple[str, ...], grid0: int, spec: tuple, args: tuple, consts: tuple, device) -> None:
    """Launch ``fn`` on ``grid0`` programs: through the JIT the first time a specialisation ``spec``
    is seen (and whenever launch hooks are registered), then through its compiled launcher."""
    with _on_device(device):
        kernel = _COMPILED.get(spec) if _DIRECT else None
        if kernel is None or _hooks_active():
            kernel = fn[(grid0,)](*args, **dict(zip(names, consts)), num_warps=_WARPS)
            if _DIRECT:
                _COMPILED[spec] = kernel
            return
        stream = torch._C._cuda_getCurrentRawStream(device)
        kernel.run(grid0, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *consts)


# Tensors below this many elements are grouped: each would fill about a wave of the GPU or less, so
# alone it costs a launch (a host call, a gap on the GPU) for little work. Larger ones keep a launch
# of their own, whose code has no table to read.
GROUP_BELOW = 1 << 21
MAX_GROUP = 64  # tensors per grouped launch (the table's width T is a power of two up to this)


def groupable(param: torch.Tensor, record: UpdateRecord | None) -> bool:
    """Whether ``param`` may join a grouped launch: a small contiguous tensor starting on a multiple of
    16 elements, of a length that is a multiple of 16, on the kernels' own arithmetic (not
    ``torch_path``), so that every tensor's blocks are as aligned as a launch of its own makes them."""
    n = param.numel()
    return (0 < n < GROUP_BELOW and n % 16 == 0 and param.is_contiguous()
            and param.dtype in _SR_MODES and param.data_ptr() % (16 * param.element_size()) == 0
            and not torch_path(param, record))


class Group:
    """The tensors of one grouped launch (``groupable``, one dtype, one device) and the device table
    that tells each program its tensor. The table holds addresses, so a group is built for tensors
    that stay where they are (a resident model's parameters) and kept by the caller, like
    ``LaunchArgs``: a captured CUDA graph reads it at every replay."""

    def __init__(self, params: Sequence[torch.Tensor], keys: Sequence[int], decay: Sequence[bool]):
        if not 1 <= len(params) <= MAX_GROUP or len({p.dtype for p in params}) != 1:
            raise ValueError(f"a grouped launch takes 1 to {MAX_GROUP} tensors of one dtype")
        self.params = list(params)
        self.base = min(self.params, key=lambda p: p.data_ptr())
        self.width = max(2, 1 << (len(params) - 1).bit_length())
        size = self.base.element_size()
        rows = {name: [] for name in _ROWS}
        start = out = 0
        for p, key, dec in zip(self.params, keys, decay):
            at, rest = divmod(p.data_ptr() - self.base.data_ptr(), size)
            if rest or at % 16 or not p.is_contiguous() or p.numel() == 0 or p.numel() % 16:
                raise ValueError("a grouped launch takes contiguous tensors of lengths that are multiples of 16, "
                                 "starting 16 elements apart")
            for name, value in zip(_ROWS, (start, at, out, p.numel(), _signed(key), int(dec))):
                rows[name].append(value)
            start += triton.cdiv(p.numel(), _BLOCK)
            out += p.numel()  # a multiple of 16: every tensor's shadows start 16-element aligned
        self.programs, self.numel = start, out
        pad = self.width - len(params)
        rows["start"] += [1 << 62] * pad  # no program reaches these
        for name in _ROWS[1:]:
            rows[name] += [0] * pad
        self.table = torch.tensor([v for name in _ROWS for v in rows[name]], dtype=torch.int64).to(
            self.base.device, non_blocking=True)


def update_and_shadows_grouped(group: Group, record: UpdateRecord | None, kind, seeds: Sequence[int],
                               scales: Sequence[tuple[float, float]], args: LaunchArgs | None = None
                               ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``update_and_shadows_of`` for every tensor of ``group`` in one launch: for each tensor (in the
    group's order) its list of (plus, minus) pairs, one per seed; the same bits as one launch per
    tensor. Unmasked only."""
    base = group.base
    sc = args if args is not None else _scalars(record, kind, seeds, scales, base.device)
    plus, minus = (_written(scales, side) for side in (0, 1))
    width = int(plus) + int(minus)
    out = torch.empty(group.numel * len(seeds) * width, dtype=base.dtype, device=base.device) if width else base
    consts = (group.width, sc.q, sc.div, sc.has_update, sc.decay, _SR_MODES[base.dtype], sc.shadow_seeds, plus,
              minus, sc.kind, FAST_MATH, sc.groups, _BLOCK)
    args_ = (base, out, group.table, sc.seeds_t, sc.coef_t)
    spec = ("grouped", base.get_device(), base.dtype, out.data_ptr() % 16 == 0, sc.aligned, _WARPS, consts)
    _run(_step_grouped_kernel, _GROUPED_CONSTS, group.programs, spec, args_, consts, base.get_device())
    slots, shadows, at = len(seeds) * width, [], 0
    for p in group.params:
        n = p.numel()
        mine = out[at * slots : (at + n) * slots].view(slots, *p.shape) if width else None
        shadows.append([(mine[i * width] if plus else p, mine[i * width + int(plus)] if minus else p)
                        for i in range(len(seeds))])
        at += n
    return shadows


def _check_dtype(param: torch.Tensor) -> None:
    if param.dtype not in _SR_MODES:
        raise TypeError(f"fused kernels take float32/bfloat16/float16/float64 tensors, not {param.dtype}")


def update_and_shadows(param, key, record: UpdateRecord | None, kind, seed, scales, threshold: float | None = None,
                       args: LaunchArgs | None = None):
    """Apply ``record`` (or None) to ``param`` in place; return (theta' + a z, theta' + b z).

    z = z(seed, key) and (a, b) = ``scales``; a shadow whose scale is 0.0 is ``param``
    itself. One read of theta, one write of theta' (only with an update), one write
    per shadow; every z is generated in registers. ``threshold`` masks the update and
    the shadows as ``distzo.update`` does. ``args``: this call's ``LaunchArgs``, kept by the
    caller (the values of record, seed and scales in device buffers that outlive the call).
    """
    return update_and_shadows_of(param, key, record, kind, (seed,), (tuple(scales),), threshold, args)[0]


def update_and_shadows_of(param, key, record: UpdateRecord | None, kind, seeds: Sequence[int],
                          scales: Sequence[tuple[float, float]], threshold: float | None = None,
                          args: LaunchArgs | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``update_and_shadows`` for several seeds in one pass: theta is read once and each seed's
    shadows (theta' + a_i z_i, theta' + b_i z_i) written, one (plus, minus) pair per seed in
    ``seeds``'s order, ``scales`` one (a_i, b_i) pair per seed. Every seed must have a nonzero
    a_i if any has, and likewise b_i (the launch writes the same shadows of each seed)."""
    if torch_path(param, record):
        return _update_and_shadows_torch(param, key, record, kind, seeds, scales, threshold)
    _check_dtype(param)
    sc = args if args is not None else _scalars(record, kind, seeds, scales, param.device)
    work = param if param.is_contiguous() else param.detach().contiguous()
    plus, minus = (_written(scales, side) for side in (0, 1))
    width = int(plus) + int(minus)
    # Every shadow in one allocation (one allocator call; freed together after the unit).
    # The caching allocator hands the same blocks back unit after unit, so no pool of our own.
    buf = torch.empty((len(seeds) * width, *param.shape), dtype=param.dtype, device=param.device) if width else None
    _launch(work, buf, plus, minus, key, sc, sc.decay and decays(param), threshold)
    if work is not param:
        param.data.copy_(work)
    return [(buf[i * width] if plus else param, buf[i * width + int(plus)] if minus else param)
            for i in range(len(seeds))]


def _written(scales: Sequence[tuple[float, float]], side: int) -> bool:
    """Whether a launch writes the shadows of ``side`` (0: a, 1: b): all seeds or none."""
    nonzero = {pair[side] != 0.0 for pair in scales}
    if len(nonzero) > 1:
        raise ValueError(f"one launch writes the same shadows of every seed; scales {list(scales)} mix zero and "
                         "nonzero on one side")
    return nonzero.pop()


def apply_update(param, key, record: UpdateRecord, kind="gaussian", threshold: float | None = None,
                 args: LaunchArgs | None = None):
    """``distzo.update.apply_update_`` on the GPU: the update alone, in one pass (``args`` as
    for ``update_and_shadows``, with seed 0 and scales 0)."""
    if torch_path(param, record):
        _update_and_shadows_torch(param, key, record, kind, (0,), ((0.0, 0.0),), threshold)
        return
    _check_dtype(param)
    sc = args if args is not None else _scalars(record, kind, (0,), ((0.0, 0.0),), param.device)
    work = param if param.is_contiguous() else param.detach().contiguous()
    _launch(work, None, False, False, key, sc, sc.decay and decays(param), threshold)
    if work is not param:
        param.data.copy_(work)


class _Drawn(Sequence):
    """The kernels' z of each seed, drawn when the update reads it: an update over h * q seeds
    holds one of them at a time, not all."""

    def __init__(self, seeds, key: int, kind, like: torch.Tensor):
        self.seeds, self.key, self.kind, self.like = seeds, key, kind, like

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, j: int) -> torch.Tensor:
        like = self.like
        return normal(self.seeds[j], self.key, 0, like.numel(), self.kind, like.device).view(like.shape)


def torch_path(param, record: UpdateRecord | None) -> bool:
    """float64 tensors, and Adam-like records whose step groups differ in size (the kernel unrolls
    groups of one size; momentum's are all q): they take the torch arithmetic, with the passes
    over theta and one tensor-sized draw per seed that the fused kernel saves."""
    if param.dtype == torch.float64:
        return True
    return record is not None and record.adam is not None and len({n for n, _, _ in record.adam}) > 1


def _update_and_shadows_torch(param, key, record, kind, seeds, scales, threshold=None):
    """float64 (rare on GPUs) and uneven Adam-like records: z from the kernels (so equal to the CPU path's
    bit for bit), arithmetic by the torch reference."""
    n = param.numel()
    if record is not None and len(record.seeds):
        apply_update_(param, key, record, kind, cached=_Drawn(record.seeds, key, kind, param), threshold=threshold)
    out = []
    for seed, pair in zip(seeds, scales):
        if pair[0] == 0.0 and pair[1] == 0.0:
            out.append((param, param))
            continue
        z = normal(seed, key, 0, n, kind, param.device).view(param.shape)
        out.append(tuple(perturbed(param, z, s, threshold) for s in pair))
    return out


def _draw(what: int, seed: int, key: int, start: int, count: int, device, dtype) -> torch.Tensor:
    unit = directions.PACKED if what == 4 else 4  # the elements of one Philox block
    first, skip = divmod(int(start), unit)
    first_block = first * (unit // 4)
    total = count + skip
    out = torch.empty(max(total, 1), dtype=dtype, device=device)
    if total:
        key_lo, key_hi = _halves(key)
        s_lo, s_hi = _halves(seed)
        with _on_device(out.device.index):
            _draw_kernel[_grid(total)](
                out, total, first_block, key_lo, key_hi, s_lo, s_hi,
                WHAT=what, FAST=FAST_MATH, BLOCK=_BLOCK, num_warps=_WARPS,
            )
    return out[skip : skip + count]


def normal(seed: int, key: int, start: int, count: int, kind="gaussian", device="cuda") -> torch.Tensor:
    """``directions.draw`` on the device: z for elements [start, start + count), float32."""
    return _draw((0, 1, 4, 5)[_kind(kind)], seed, key, start, count, device, torch.float32)


def uniform(seed: int, key: int, start: int, count: int, device="cuda") -> torch.Tensor:
    """``directions.uniform`` on the device (exact: no transcendental involved)."""
    return _draw(2, seed, key, start, count, device, torch.float32)


def raw_words(seed: int, key: int, start: int, count: int, device="cuda") -> torch.Tensor:
    """``directions.raw_words`` on the device: the Philox words as int64 holding uint32."""
    return _draw(3, seed, key, start, count, device, torch.int64)


__all__ = ["update_and_shadows", "update_and_shadows_of", "update_and_shadows_grouped", "Group", "groupable",
           "GROUP_BELOW", "MAX_GROUP", "apply_update", "MAX_SHADOW_SEEDS", "LaunchArgs", "layout_of", "torch_path", "normal", "uniform",
           "raw_words", "FAST_MATH"]
