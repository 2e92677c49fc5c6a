"""A dataset of one's own: read from any source ``datasets`` reads, its splits given their roles.

The train split is ``TaskConfig.train_split``; dev and test are the splits the config names,
else the data's "validation" and "test" splits, else they are carved out of the train split
(``distzo.tasks.splits``). A split or column that is not there is a ValueError that names the
dataset and what it does have (datasets itself refuses empty splits, see ``sources``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from distzo.tasks.base import TEST_SEED, Example, TaskConfig, TaskData, shuffled
from distzo.tasks.sources import Split, load_source
from distzo.tasks.splits import deal, split_sizes

log = logging.getLogger(__name__)

Record = Mapping[str, Any]
# A record to its example; the string says where the record is, for error messages.
Convert = Callable[[Record, str], Example]

DEFAULT_DEV, DEFAULT_TEST = "validation", "test"
# The TaskConfig fields every task on a dataset of one's own reads.
SOURCE_OPTIONS = ("dataset", "dataset_config", "train_split", "dev_split", "test_split")


def source_of(cfg: TaskConfig) -> str:
    """The dataset a task on one's own data reads: ``cfg.dataset``, or ``cfg.data_path`` for a local one."""
    if cfg.dataset is not None and cfg.data_path is not None:
        raise ValueError(f"task {cfg.name!r} reads dataset or data_path, not both; drop one of them")
    source = cfg.dataset or cfg.data_path
    if source is None:
        raise ValueError(f"task {cfg.name!r} needs data: dataset (a hub id or a path) or data_path (a local file)")
    return source


class Part(NamedTuple):
    """One split of the data, under the data's own name for it."""

    name: str
    rows: Split


@dataclass
class UserData:
    """The dataset ``source`` with its train split and, where the data has them, dev and test splits."""

    source: str
    train: Part
    dev: Part | None
    test: Part | None

    @classmethod
    def load(cls, source: str, cfg: TaskConfig) -> UserData:
        splits = load_source(source, cfg.dataset_config)
        test = cfg.test_split or _present(DEFAULT_TEST, splits, (cfg.train_split, cfg.dev_split))
        dev = cfg.dev_split or _present(DEFAULT_DEV, splits, (cfg.train_split, test))
        roles = {"train": cfg.train_split, "dev": dev, "test": test}
        named = [name for name in roles.values() if name is not None]
        if len(set(named)) < len(named):
            given = ", ".join(f"{role} {name!r}" for role, name in roles.items() if name is not None)
            raise ValueError(f"dataset {source!r}: train, dev and test must be different splits, got {given}")
        parts = {role: _part(source, splits, role, name) if name else None for role, name in roles.items()}
        return cls(source, parts["train"], parts["dev"], parts["test"])

    def parts(self) -> list[Part]:
        return [p for p in (self.train, self.dev, self.test) if p is not None]

    @property
    def columns(self) -> list[str]:
        return list(self.train.rows.column_names)

    def require(self, columns: Sequence[str], what: str = "column") -> None:
        """ValueError naming the first of ``columns`` that some split lacks, and the columns it has."""
        for part in self.parts():
            have = list(part.rows.column_names)
            missing = [c for c in columns if c not in have]
            if missing:
                raise ValueError(
                    f"dataset {self.source!r} has no {what} {missing[0]!r} (split {part.name!r}); "
                    f"its columns: {', '.join(have)}"
                )

    def values(self, column: str) -> set[Any]:
        """The distinct values of ``column`` over every split used."""
        return {value for part in self.parts() for value in part.rows.unique(column)}

    def sample(self, cfg: TaskConfig, convert: Convert) -> TaskData:
        """Train, dev and test examples: drawn from their own splits, or carved out of the train split."""
        wanted = (cfg.num_train, cfg.num_dev if self.dev is None else 0, cfg.num_test if self.test is None else 0)
        sizes = split_sizes(len(self.train.rows), wanted, f"dataset {self.source!r} split {self.train.name!r}")
        train, dev, test = deal(len(self.train.rows), sizes, cfg.seed)
        carved = {"train": (self.train, train), "dev": (self.train, dev), "test": (self.train, test)}
        if self.dev is not None:
            carved["dev"] = (self.dev, _drawn(self.dev, cfg.num_dev, cfg.seed))
        if self.test is not None:
            carved["test"] = (self.test, _drawn(self.test, cfg.num_test, TEST_SEED))
        examples = {role: self._convert(part, rows, convert) for role, (part, rows) in carved.items()}
        return TaskData(train=examples["train"], dev=examples["dev"], test=examples["test"])

    def _convert(self, part: Part, rows: list[int], convert: Convert) -> list[Example]:
        return [convert(part.rows[i], f"dataset {self.source!r} split {part.name!r} row {i}") for i in rows]


def _present(name: str, splits: Mapping[str, Split], taken: Sequence[str | None]) -> str | None:
    return name if name in splits and name not in taken else None


def _part(source: str, splits: Mapping[str, Split], role: str, name: str) -> Part:
    if name not in splits:
        raise ValueError(f"dataset {source!r} has no split {name!r} for {role}; its splits: {', '.join(splits)}")
    return Part(name, splits[name])


def _drawn(part: Part, n: int, seed: int) -> list[int]:
    if n > len(part.rows):
        log.warning("split %r has %d examples, fewer than the %d asked for", part.name, len(part.rows), n)
    return shuffled(len(part.rows), seed)[:n]
