"""Counter-based perturbation directions.

Element ``i`` of the parameter tensor with key ``k`` under the step seed ``s`` gets
its value from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC'11) evaluated at

    counter = (i // 4 mod 2^32, i // 4 >> 32, k mod 2^32, k >> 32),  key = (s mod 2^32, s >> 32)

and taking output word ``i % 4``. Nothing depends on a running RNG state, so the
same z comes out on any device, in any process, in any order, and for any slice of
a tensor generated on its own. The GPU kernels produce the same integer stream.

Words become floats exactly: ``u = ((x >> 9) * 2 + 1) * 2^-24`` lies in (0, 1) and
is representable in float32. Gaussian directions pair words (0, 1) and (2, 3) of a
block with the Box-Muller transform in float32; rademacher directions take the top
bit of each word (0 -> +1, 1 -> -1).

``rademacher-packed`` directions are signs too, but take every bit of a block: element
``i`` gets bit ``i % 32`` of word ``(i // 32) % 4`` of block ``i // 128`` (0 -> +1,
1 -> -1). The distribution is the same as rademacher's; the signs are others, and one
Philox call serves 128 elements instead of 4, which is what a GPU pass that regenerates
several directions per element is bound by.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch

Kind = Literal["gaussian", "rademacher", "rademacher-packed"]
KINDS = ("gaussian", "rademacher", "rademacher-packed")
PACKED = 128  # elements per Philox block in the rademacher-packed kind (4 words x 32 bits)

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
# Elements generated per chunk: small enough that the int64 temporaries stay in
# cache, large enough that torch's per-op overhead is amortised.
_CHUNK = 1 << 20


def stable_key(text: str) -> int:
    """A 64-bit key from a string, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def step_seed(run_seed: int, step: int, direction: int) -> int:
    """The 64-bit seed of direction ``direction`` at optimiser step ``step``."""
    return stable_key(f"distzo/{run_seed}/{step}/{direction}")


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors (or ints) holding unsigned 32-bit values.

    The 32x32-bit products may wrap around int64; the low 64 bits are still exact,
    so the high and low words are read off correctly.
    """
    for _ in range(rounds):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = (
            ((p1 >> 32) & _MASK32) ^ c1 ^ k0,
            p1 & _MASK32,
            ((p0 >> 32) & _MASK32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _blocks(seed: int, key: int, first: int, last: int) -> torch.Tensor:
    """Philox words of blocks [first, last) as an (n, 4) int64 tensor of uint32 values."""
    block = torch.arange(first, last, dtype=torch.int64)
    key_lo = torch.full_like(block, key & _MASK32)
    key_hi = torch.full_like(block, (key >> 32) & _MASK32)
    words = philox4x32(block & _MASK32, block >> 32, key_lo, key_hi, seed & _MASK32, (seed >> 32) & _MASK32)
    return torch.stack(words, dim=1)


def raw_words(seed: int, key: int, start: int, count: int) -> torch.Tensor:
    """The Philox words (int64 holding uint32) of elements [start, start+count)."""
    first, last = start // 4, (start + count + 3) // 4
    offset = start - first * 4
    return _blocks(seed, key, first, last).reshape(-1)[offset : offset + count]


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Exact float32 in (0, 1) from a 32-bit word: odd multiples of 2^-24."""
    return ((word >> 9) * 2 + 1).to(torch.float32).mul_(2.0**-24)


def _gaussian_from_blocks(words: torch.Tensor) -> torch.Tensor:
    """Box-Muller over (nblocks, 4) words -> (nblocks, 4) float32 normals."""
    u = [_uniform(words[:, lane]) for lane in range(4)]
    r01, t01 = u[0].log_().mul_(-2.0).sqrt_(), u[1].mul_(2.0 * math.pi)
    r23, t23 = u[2].log_().mul_(-2.0).sqrt_(), u[3].mul_(2.0 * math.pi)
    return torch.stack((r01 * torch.cos(t01), r01 * torch.sin(t01), r23 * torch.cos(t23), r23 * torch.sin(t23)), 1)


def _packed_chunk(seed: int, key: int, start: int, count: int) -> torch.Tensor:
    """rademacher-packed z of elements [start, start+count): bit i % 32 of word (i // 32) % 4 of block i // 128."""
    first, last = start // PACKED, (start + count + PACKED - 1) // PACKED
    bits = (_blocks(seed, key, first, last).unsqueeze(-1) >> torch.arange(32)) & 1
    offset = start - first * PACKED
    return (1.0 - 2.0 * bits.to(torch.float32)).reshape(-1)[offset : offset + count]


def _draw_chunk(seed: int, key: int, start: int, count: int, kind: Kind) -> torch.Tensor:
    if kind == "rademacher-packed":
        return _packed_chunk(seed, key, start, count)
    first, last = start // 4, (start + count + 3) // 4
    words = _blocks(seed, key, first, last)
    if kind == "gaussian":
        values = _gaussian_from_blocks(words)
    else:
        values = 1.0 - 2.0 * (words >> 31).to(torch.float32)
    offset = start - first * 4
    return values.reshape(-1)[offset : offset + count]


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation kind {kind!r}; choose one of {', '.join(KINDS)}")


def _chunks(count: int):
    """(offset, length) of the cache-sized pieces of ``count`` elements."""
    for lo in range(0, count, _CHUNK):
        yield lo, min(_CHUNK, count - lo)


def draw(seed: int, key: int, start: int, count: int, kind: Kind = "gaussian") -> torch.Tensor:
    """z for elements [start, start+count) of the tensor keyed ``key``: float32, on the CPU."""
    check_kind(kind)
    out = torch.empty(count, dtype=torch.float32)
    for lo, n in _chunks(count):
        out[lo : lo + n] = _draw_chunk(seed, key, start + lo, n, kind)
    return out


def uniform(seed: int, key: int, start: int, count: int) -> torch.Tensor:
    """Uniform float32 in (0, 1) for elements [start, start+count), one word each."""
    out = torch.empty(count, dtype=torch.float32)
    for lo, n in _chunks(count):
        out[lo : lo + n] = _uniform(raw_words(seed, key, start + lo, n))
    return out


def direction_like(param: torch.Tensor, seed: int, key: int, kind: Kind = "gaussian") -> torch.Tensor:
    """z with the shape of ``param``, float32, on the parameter's device."""
    return draw(seed, key, 0, param.numel(), kind).view(param.shape).to(param.device)


def add_direction_(target: torch.Tensor, seed: int, key: int, alpha: float, kind: Kind = "gaussian") -> torch.Tensor:
    """``target += alpha * z`` without materialising the whole of z (float targets, any device)."""
    check_kind(kind)
    flat = target.view(-1)
    for lo, n in _chunks(flat.numel()):
        z = _draw_chunk(seed, key, lo, n, kind).to(device=flat.device)
        flat[lo : lo + n].add_(z.to(flat.dtype), alpha=alpha)
    return target
