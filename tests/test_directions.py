"""Counter-based directions: Philox known answers, published z vectors, slicing, processes."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distzo import directions as d

# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# distzo's own published vectors (docs/directions.md): seed 1, key 2, elements 0..7.
WORDS_SEED1_KEY2 = [0xE73404CF, 0x8CEDC5D3, 0x3F071736, 0x0A0AFDDD, 0xB7B4C173, 0xDB04B052, 0x44541F91, 0x0E0B3CF3]
GAUSS_SEED1_KEY2 = [-0.42886275, -0.14084622, 1.62367237, 0.40852711, 0.50149733, -0.64201337, 1.52972913, 0.54920578]
RADEMACHER_SEED1_KEY2 = [-1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0]


@pytest.mark.parametrize("counter,key,expected", RANDOM123_KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in d.philox4x32(*counter, *key)) == expected


def test_philox_on_tensors_matches_scalars():
    c = torch.tensor([0, 0xFFFFFFFF, 0x243F6A88], dtype=torch.int64)
    out = d.philox4x32(c, c, c, c, 0xA4093822, 0x299F31D0)
    for i in range(3):
        v = int(c[i])
        assert tuple(int(o[i]) for o in out) == tuple(int(w) for w in d.philox4x32(v, v, v, v, 0xA4093822, 0x299F31D0))


def _reference_words(seed: int, key: int, block: int) -> list[int]:
    """One block's words by Philox4x32-10 on Python ints, as the paper states it (no tensors, no wrap)."""
    m0, m1, w0, w1, mask = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
    c = [block & mask, block >> 32, key & mask, key >> 32]
    k = [seed & mask, seed >> 32]
    for _ in range(10):
        p0, p1 = c[0] * m0, c[2] * m1
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & mask, (p0 >> 32) ^ c[3] ^ k[1], p0 & mask]
        k = [(k[0] + w0) & mask, (k[1] + w1) & mask]
    return c


@pytest.mark.parametrize("seed,key,start,count", [
    (0, 0, 0, 64),
    (2**64 - 1, 2**64 - 1, 5, 300),
    (0x123456789ABCDEF0, 0xFEDCBA9876543210, (1 << 20) + 3, 1000),
    (7, 2**63 + 11, 4 * (2**32 - 40) + 1, 400),  # blocks across 2^32: the counter's second word changes
    (3, 99, 4 * (2**32 - 20), 160),  # the same, in whole blocks (the Gaussians too)
])
def test_tensor_words_equal_the_scalar_definition(seed, key, start, count):
    """The vectorised Philox (in-place rounds, the key words kept as ints) gives the words of the
    scalar definition, and the floats come from them as the formulas of the module docstring say."""
    first = start // 4
    words = [w for b in range(first, (start + count + 3) // 4) for w in _reference_words(seed, key, b)]
    words = torch.tensor(words[start - 4 * first:][:count], dtype=torch.int64)
    assert torch.equal(d.raw_words(seed, key, start, count), words)
    u = ((words >> 9) * 2 + 1).to(torch.float32) * 2.0**-24
    assert torch.equal(d.uniform(seed, key, start, count), u)
    assert torch.equal(d.draw(seed, key, start, count, "rademacher"), 1.0 - 2.0 * (words >> 31).to(torch.float32))
    if start % 4 == 0 and count % 4 == 0:  # whole blocks: Box-Muller pairs words (0, 1) and (2, 3)
        w = u.view(-1, 4)
        r01, r23 = (-2.0 * w[:, 0].log()).sqrt(), (-2.0 * w[:, 2].log()).sqrt()
        t01, t23 = 2.0 * math.pi * w[:, 1], 2.0 * math.pi * w[:, 3]
        z = torch.stack((r01 * t01.cos(), r01 * t01.sin(), r23 * t23.cos(), r23 * t23.sin()), 1).reshape(-1)
        assert torch.equal(d.draw(seed, key, start, count), z)


def test_published_vectors():
    assert [int(w) for w in d.raw_words(1, 2, 0, 8)] == WORDS_SEED1_KEY2
    # Floats go through log/cos/sin: allow a few ulp across platforms.
    torch.testing.assert_close(d.draw(1, 2, 0, 8), torch.tensor(GAUSS_SEED1_KEY2), rtol=1e-6, atol=1e-6)
    assert d.draw(1, 2, 0, 8, "rademacher").tolist() == RADEMACHER_SEED1_KEY2


def test_packed_signs_take_every_bit_of_a_block():
    # element i: bit i % 32 of word (i // 32) % 4 of block i // 128 (1 -> -1); the words are those
    # of elements 0..7 above (block 0's four words, then block 1's)
    z = d.draw(1, 2, 0, 160, "rademacher-packed")
    assert z[:8].tolist() == [-1, -1, -1, -1, 1, 1, -1, -1]  # 0xE73404CF from bit 0 up
    assert z[32:40].tolist() == [-1, -1, 1, 1, -1, 1, -1, -1]  # 0x8CEDC5D3
    assert z[128:136].tolist() == [-1, -1, 1, 1, -1, -1, -1, 1]  # 0xB7B4C173: block 1, word 0
    for i in (0, 5, 31, 32, 77, 127, 128, 159):
        word = WORDS_SEED1_KEY2[4 * (i // 128) + (i // 32) % 4]
        assert z[i] == 1 - 2 * ((word >> (i % 32)) & 1), i


def test_shared_signs_are_lanes_of_the_familys_words():
    # a seed's family is its bits above the lowest five, its lane the lowest five; element i takes
    # bit 31 - lane of word i % 4 of block i // 4 under the family: lane 0 is rademacher's top bit
    family = 1 << 5  # seed 32: the family of seeds 32 .. 63
    assert torch.equal(d.draw(family, 2, 0, 64, "rademacher-shared"), d.draw(family, 2, 0, 64, "rademacher"))
    words = d.raw_words(family, 2, 0, 64)
    for lane in (0, 1, 7, 31):
        z = d.draw(family + lane, 2, 0, 64, "rademacher-shared")
        assert torch.equal(z, 1.0 - 2.0 * ((words >> (31 - lane)) & 1).to(torch.float32)), lane
    assert d.family(family + 31) == family and d.family(-1) == -32  # two's complement: the same low bits


def test_shared_directions_are_the_runs_directions_in_families_of_32_lanes():
    """Direction n = step q + j of a run is lane n mod 32 of family n div 32: no lane of a family twice,
    a step's probes and consecutive steps in one family."""
    seeds = [s for t in range(40) for s in d.step_seeds(3, t, 3, "rademacher-shared")]
    families = [d.family(s) for s in seeds]
    assert len(set(seeds)) == 120 and [s % 32 for s in seeds] == [n % 32 for n in range(120)]
    assert families == [families[32 * (n // 32)] for n in range(120)] and len(set(families)) == 4
    assert d.step_seeds(3, 7, 3, "rademacher-shared") == [d.step_seed(3, 7, j, "rademacher-shared", 3) for j in range(3)]
    assert d.family(d.step_seed(4, 0, 0, "rademacher-shared")) != families[0]  # another run, another family
    with pytest.raises(ValueError, match="direction 3 of a step of 3"):
        d.step_seed(3, 0, 3, "rademacher-shared", 3)
    # the other kinds keep one independent seed per (step, direction), as their logs hold them
    assert d.step_seeds(3, 9, 3, "rademacher") == [d.step_seed(3, 9, j) for j in range(3)]


def test_the_kernels_uniform_identity_holds_for_every_word():
    """The GPU kernel forms u as (1 + (w >> 9) 2^-23) - (1 - 2^-24) from float bits (no conversion):
    equal, bit for bit, to directions' ((w >> 9) * 2 + 1) 2^-24 for every one of the 2^23 values."""
    k = torch.arange(1 << 23, dtype=torch.int32)
    ones = (k | 0x3F800000).view(torch.float32)
    kernel = ones - torch.tensor(1 - 2.0**-24, dtype=torch.float32)
    assert torch.equal(kernel.view(torch.int32), d._uniform(k.to(torch.int64) << 9).view(torch.int32))


def test_word_to_uniform_is_exact_and_open():
    words = torch.tensor([0, 511, 512, 0xFFFFFFFF], dtype=torch.int64)
    u = d._uniform(words)
    assert u.tolist() == [2.0**-24, 2.0**-24, 3 * 2.0**-24, 1 - 2.0**-24]


@pytest.mark.parametrize("kind", d.KINDS)
def test_slice_equals_slice_of_whole(kind):
    chunk = d._CHUNK
    whole = d.draw(7, 99, 0, chunk + 4099, kind)
    for start, count in [(0, 1), (1, 6), (3, 13), (127, 130), (chunk - 3, 9), (chunk + 1, 4097), (5, chunk + 11)]:
        assert torch.equal(d.draw(7, 99, start, count, kind), whole[start : start + count]), (start, count)


def test_direction_like_shape_and_content():
    p = torch.empty(33, 17)
    z = d.direction_like(p, 3, 4)
    assert z.shape == p.shape and z.dtype == torch.float32
    assert torch.equal(z.view(-1), d.draw(3, 4, 0, p.numel()))


def test_add_direction_matches_explicit():
    target = torch.randn(3000, dtype=torch.float64)
    expected = target + 0.5 * d.draw(11, 12, 0, 3000).double()
    d.add_direction_(target, 11, 12, 0.5)
    assert torch.equal(target, expected)


def test_distinct_keys_and_seeds_give_distinct_directions():
    a, b, c = d.draw(1, 2, 0, 1000), d.draw(1, 3, 0, 1000), d.draw(2, 2, 0, 1000)
    assert abs(float((a * b).mean())) < 0.15 and abs(float((a * c).mean())) < 0.15


def test_moments():
    n = 1 << 20
    z = d.draw(5, 6, 0, n).double()
    # 5 standard errors: se(mean) = 1/sqrt(n), se(var) = sqrt(2/n).
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    assert abs(float((z**4).mean()) - 3) < 0.05  # gaussian tails, not uniform-ish
    r = d.draw(5, 6, 0, n, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(float(r.mean())) < 5 / n**0.5
    packed = d.draw(5, 6, 0, n, "rademacher-packed").double()
    assert set(packed.unique().tolist()) == {-1.0, 1.0} and abs(float(packed.mean())) < 5 / n**0.5
    # neighbours come from one word: no correlation between bits of it
    assert abs(float((packed[1:] * packed[:-1]).mean())) < 5 / n**0.5
    # the lanes of a family are bits of one word: each fair, no two correlated
    lanes = torch.stack([d.draw(64 + j, 6, 0, n, "rademacher-shared").double() for j in (0, 1, 17, 31)])
    assert set(lanes.unique().tolist()) == {-1.0, 1.0} and float(lanes.mean(1).abs().max()) < 5 / n**0.5
    cross = lanes @ lanes.T / n
    assert float((cross - torch.eye(4, dtype=torch.float64)).abs().max()) < 5 / n**0.5


def test_same_in_another_process():
    code = "from distzo.directions import draw; import sys; sys.stdout.write(draw(123, 456, 1000, 64).numpy().tobytes().hex())"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert bytes.fromhex(out) == d.draw(123, 456, 1000, 64).numpy().tobytes()


def test_stable_keys():
    assert d.stable_key("model.embed_tokens.weight") == 17744852841324204394
    assert d.step_seed(0, 0, 0) == 15271282189758190121
    assert d.step_seed(0, 1, 0) != d.step_seed(0, 0, 1)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown perturbation kind"):
        d.draw(0, 0, 0, 4, "uniform")
