"""Sizes and indices of the train, dev and test samples carved out of one pool of examples.

The test sample is drawn first, with the fixed ``TEST_SEED``, so it stays the same when only
the training seed changes; train and dev are dealt from the rest with the task's seed. The
three never overlap.
"""

from __future__ import annotations

import logging
import random

from distzo.tasks.base import TEST_SEED, shuffled

log = logging.getLogger(__name__)

# Shares of a small pool given to dev and test when the requested sizes do not fit.
HELD_OUT_SHARE = 0.1

Sizes = tuple[int, int, int]


def split_sizes(n: int, wanted: Sizes, name: str) -> Sizes:
    """The ``wanted`` (train, dev, test) sizes if they fit in ``n``, else a 80/10/10 split capped by them."""
    if sum(wanted) <= n:
        return wanted
    num_train, num_dev, num_test = wanted
    held_out = int(n * HELD_OUT_SHARE)
    test_n = min(num_test, held_out)
    dev_n = min(num_dev, held_out)
    train_n = min(num_train, n - test_n - dev_n)
    log.warning("%s has %d examples, fewer than the %d asked for; using %d/%d/%d",
                name, n, sum(wanted), train_n, dev_n, test_n)  # fmt: skip
    return train_n, dev_n, test_n


def deal(n: int, sizes: Sizes, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Disjoint (train, dev, test) indices into a pool of ``n`` examples, of the given sizes."""
    train_n, dev_n, test_n = sizes
    order = shuffled(n, TEST_SEED)
    test = order[:test_n]
    rest = order[test_n:]
    random.Random(seed).shuffle(rest)
    return rest[:train_n], rest[train_n : train_n + dev_n], test
