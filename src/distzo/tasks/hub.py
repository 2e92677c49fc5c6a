"""Tasks read through ``datasets``, sampled the way MeZO samples them.

MeZO trains on a few hundred or thousand examples drawn from the train split with the
run's seed, picks dev examples from the rest of the train split, and tests on examples
drawn from the validation split (the benchmarks' test labels are hidden).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Mapping

from distzo.tasks.base import TEST_SEED, Example, Task, TaskConfig, TaskData, render, shuffled, take
from distzo.tasks.sources import Split, load_splits

Record = Mapping[str, Any]
Convert = Callable[[Record], Example | None]


class HubTask(Task):
    """A task whose records come from a hub dataset (or a local copy in the same schema).

    Subclasses turn one record into one ``Example`` in ``convert``; returning None skips a
    record that cannot be used (e.g. a test-set label of -1).
    """

    hub_path: str = ""
    hub_name: str | None = None

    def load(self, cfg: TaskConfig) -> TaskData:
        self.check_template(cfg)
        splits = load_splits(self.hub_path, self.hub_name, cfg.data_path)
        return sample_splits(splits.get("train", []), splits.get("validation"), cfg, self.converter(cfg))

    def converter(self, cfg: TaskConfig) -> Convert:
        return lambda record: self.convert(record, cfg)

    def convert(self, record: Record, cfg: TaskConfig) -> Example | None:
        raise NotImplementedError


def sample_splits(train_pool: Split, test_pool: Split | None, cfg: TaskConfig, convert: Convert) -> TaskData:
    """Train and dev from ``train_pool`` with ``cfg.seed``; test from ``test_pool`` with a fixed seed.

    Without a test pool the test examples are carved out of the train pool first (fixed
    seed), so they stay the same across seeds and never overlap train or dev.
    """
    if test_pool is not None:
        test, _ = take(test_pool, shuffled(len(test_pool), TEST_SEED), cfg.num_test, convert)
        rest = shuffled(len(train_pool), cfg.seed)
    else:
        fixed = shuffled(len(train_pool), TEST_SEED)
        test, used = take(train_pool, fixed, cfg.num_test, convert)
        rest = fixed[used:]
        random.Random(cfg.seed).shuffle(rest)
    train, used = take(train_pool, rest, cfg.num_train, convert)
    dev, _ = take(train_pool, rest[used:], cfg.num_dev, convert)
    return TaskData(train=train, dev=dev, test=test)


class TemplateTask(HubTask):
    """Classification with a flat prompt template and a fixed verbaliser (label i -> candidates[i])."""

    kind = "classification"
    supports_template = True
    template: str = ""
    verbalizer: tuple[str, ...] = ()

    def fields(self, record: Record) -> dict[str, Any]:
        """The values the template may use; subclasses clean them up as MeZO does."""
        return dict(record)

    def convert(self, record: Record, cfg: TaskConfig) -> Example | None:
        label = record.get("label")
        if label is None or not 0 <= int(label) < len(self.verbalizer):
            return None
        prompt = render(cfg.template or self.template, self.fields(record))
        return Example(prompt=prompt, candidates=list(self.verbalizer), gold=int(label))
