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

``rademacher-shared`` directions let the probes of one step share each Philox draw. A seed
is a *family* (its bits above the lowest five) and a *lane* (its lowest five bits): element
``i`` gets bit ``31 - lane`` of word ``i % 4`` of block ``i // 4`` under the family's seed
(0 -> +1, 1 -> -1), so lane 0 is rademacher under the family seed, and the 32 lanes of a
family are 32 independent fair signs per element from one word. ``step_seed`` numbers a run's
directions in order (step by step, q a step) and makes each run of 32 the lanes of one family,
so a pass that draws a step's probes (FZOO's N, MeZO's q) or the steps of a momentum window
computes one Philox block per four elements for all of them (two where a family ends inside).
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch

Kind = Literal["gaussian", "rademacher", "rademacher-packed", "rademacher-shared"]
KINDS = ("gaussian", "rademacher", "rademacher-packed", "rademacher-shared")
PACKED = 128  # elements per Philox block in the rademacher-packed kind (4 words x 32 bits)
LANES = 32  # directions of one family in the rademacher-shared kind (the bits of a word)

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


def step_seed(run_seed: int, step: int, direction: int, kind: str = "gaussian", per_step: int = 1) -> int:
    """The 64-bit seed of direction ``direction`` of the ``per_step`` directions of optimiser step
    ``step``. Every kind but rademacher-shared has one independent seed per (step, direction).
    rademacher-shared numbers the run's directions n = step * per_step + direction and gives n lane
    n mod 32 of family n div 32 (a key of its own with the lowest five bits cleared): no two
    directions of a run share a lane of a family, and consecutive ones share the family."""
    if kind != "rademacher-shared":
        return stable_key(f"distzo/{run_seed}/{step}/{direction}")
    if not 0 <= direction < per_step:
        raise ValueError(f"direction {direction} of a step of {per_step}: rademacher-shared numbers a run's "
                         "directions by their step's count")
    n = step * per_step + direction
    family = stable_key(f"distzo/{run_seed}/shared/{n // LANES}")
    return family - family % LANES + n % LANES


def step_seeds(run_seed: int, step: int, count: int, kind: str = "gaussian") -> list[int]:
    """The seeds of the ``count`` directions of step ``step`` (``step_seed``)."""
    return [step_seed(run_seed, step, j, kind, count) for j in range(count)]


def family(seed: int) -> int:
    """The Philox seed a rademacher-shared direction draws from: ``seed`` without its lane bits."""
    return seed - seed % LANES


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors (or ints) holding unsigned 32-bit values.

    The 32x32-bit products may wrap around int64; the low 64 bits are still exact,
    so the high and low words are read off correctly. A counter word given as an int
    (the tensor's key, the same for every block) stays an int as long as the rounds
    leave it one; tensor words are worked on in place (the products are fresh tensors).
    """
    for _ in range(rounds):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c2 = _high_xor(p1, c1, k0), _high_xor(p0, c3, k1)
        c1, c3 = _low(p1), _low(p0)
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _high_xor(p, a, b):
    """The high word of the 32 x 32-bit product ``p``, XOR ``a`` XOR ``b`` (words below 2^32).

    XOR before masking: an int64 product that wrapped shifts in copies of its sign bit,
    which the XORs (of values below 2^32) leave above bit 31 for the mask to clear."""
    if isinstance(p, int):
        return ((p >> 32) ^ a ^ b) & _MASK32
    return (p >> 32).bitwise_xor_(a).bitwise_xor_(b).bitwise_and_(_MASK32)


def _low(p):
    """The low word of the product ``p`` (in place: ``p`` is not read again)."""
    return p & _MASK32 if isinstance(p, int) else p.bitwise_and_(_MASK32)


def _words(seed: int, key: int, first: int, last: int) -> list[torch.Tensor]:
    """The four Philox words of blocks [first, last), each an int64 tensor of uint32 values."""
    block = torch.arange(first, last, dtype=torch.int64)
    high = first >> 32  # the counter's second word: one int unless the blocks cross a multiple of 2^32
    c1 = high if (last - 1) >> 32 == high else block >> 32
    words = philox4x32(block.bitwise_and_(_MASK32), c1, key & _MASK32, (key >> 32) & _MASK32,
                       seed & _MASK32, (seed >> 32) & _MASK32)
    return [torch.full((last - first,), w, dtype=torch.int64) if isinstance(w, int) else w for w in words]


def _blocks(seed: int, key: int, first: int, last: int) -> torch.Tensor:
    """Philox words of blocks [first, last) as an (n, 4) int64 tensor of uint32 values."""
    return torch.stack(_words(seed, key, first, last), dim=1)


def raw_words(seed: int, key: int, start: int, count: int) -> torch.Tensor:
    """The Philox words (int64 holding uint32) of elements [start, start+count)."""
    first, last = start // 4, (start + count + 3) // 4
    offset = start - first * 4
    return _blocks(seed, key, first, last).reshape(-1)[offset : offset + count]


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Exact float32 in (0, 1) from a 32-bit word: odd multiples of 2^-24, ((w >> 9) * 2 + 1) 2^-24
    (formed as (w >> 8) | 1, the same integer)."""
    return ((word >> 8).bitwise_or_(1)).to(torch.float32).mul_(2.0**-24)


def _gaussian_from_blocks(words: list[torch.Tensor]) -> torch.Tensor:
    """Box-Muller over a block's four words (each an nblocks tensor) -> (nblocks, 4) float32 normals."""
    u = [_uniform(word) for word in words]
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
    if kind == "gaussian":
        values = _gaussian_from_blocks(_words(seed, key, first, last))
    elif kind == "rademacher-shared":  # bit 31 - lane of the family's word
        bits = (_blocks(family(seed), key, first, last) >> (LANES - 1 - seed % LANES)) & 1
        values = 1.0 - 2.0 * bits.to(torch.float32)
    else:
        values = 1.0 - 2.0 * (_blocks(seed, key, first, last) >> 31).to(torch.float32)
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
