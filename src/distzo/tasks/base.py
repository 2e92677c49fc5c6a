"""The data model every task produces: examples, splits, the task interface and its config.

A task turns raw records into ``Example``s that already carry the prompt text and the
verbalised answers, so batching (``collate``), losses and evaluation never need to
know which task they are looking at.
"""

from __future__ import annotations

import logging
import random
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Literal, Sequence, TypeVar

log = logging.getLogger(__name__)

Kind = Literal["classification", "generation", "lm"]
KINDS: tuple[str, ...] = ("classification", "generation", "lm")

# Test examples are drawn with this seed whatever the training seed, so runs that differ
# only in their seed are scored on the same examples (MeZO does the same).
TEST_SEED = 0

# TaskConfig fields that only the tasks on a dataset of one's own read (each lists those it
# reads in ``Task.options``); any other task refuses them, since they would do nothing there.
DATA_OPTIONS = (
    "dataset", "dataset_config", "train_split", "dev_split", "test_split", "text_column", "label_column",
    "labels", "label_values", "prompt_column", "completion_column", "messages_column",
)  # fmt: skip

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Example:
    """One example, already rendered as text.

    Classification: the model scores ``prompt + candidates[i]`` for every i. A candidate
    is exactly the text that follows the prompt, with its leading space where the text
    has one (" great" after "It was"; "Yes" after a prompt that ends in a newline).
    Generation / SFT: the model is trained on ``target`` given ``prompt``; generation
    tasks list every acceptable answer in ``answers`` for F1/EM. With ``eos`` the target
    is followed by the tokenizer's EOS, trained too, so a tuned model learns to stop.
    Plain-text LM: ``prompt`` is "" and ``target`` is the text itself.
    Chat: ``messages`` is the conversation ({"role": ..., "content": ...} turns) and the
    other text fields stay empty; collate renders it with the tokenizer's chat template,
    loss on the assistant turns (see ``distzo.tasks.chat``).
    """

    prompt: str = ""
    candidates: list[str] = field(default_factory=list)
    gold: int | None = None
    target: str | None = None
    answers: list[str] = field(default_factory=list)
    eos: bool = False
    messages: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.gold is not None and not 0 <= self.gold < len(self.candidates):
            raise ValueError(f"gold index {self.gold} is out of range for {len(self.candidates)} candidates")
        if self.messages and (self.prompt or self.target is not None or self.candidates):
            raise ValueError("a conversation carries its text in messages alone, not in prompt, target or candidates")


@dataclass
class TaskData:
    """The three disjoint splits of a task."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]


@dataclass
class TaskConfig:
    """Which task to load and how much of it."""

    name: str = "rotten_tomatoes"
    """Task name, a key of ``distzo.tasks.TASKS``."""
    data_path: str | None = None
    """Local copy of the data (a file, a folder of split files, or a ``save_to_disk`` folder).
    Hub tasks read the hub when it is None; ``jsonl`` requires it; ``text`` defaults to Hamlet;
    ``sft`` and ``classification`` read it as they read ``dataset``."""
    num_train: int = 1000
    """Training examples, sampled with ``seed``."""
    num_dev: int = 500
    """Development examples, disjoint from the training ones."""
    num_test: int = 1000
    """Test examples, drawn with a fixed seed so they do not change with ``seed``."""
    seed: int = 0
    """Seed of the train/dev sample."""
    max_length: int = 256
    """Token budget of a row; the text task cuts its chunks to about this many tokens."""
    pad_to_multiple_of: int = 1
    """Pad each training batch's width up to a multiple of this (1: to its longest row). Fewer distinct widths, so
    that optim.cuda_graphs captures each once; the losses equal the unpadded ones up to float rounding."""
    template: str | None = None
    """Prompt template overriding the task's own, with ``{field}`` placeholders naming record
    fields (e.g. "Review: {text}\\nSentiment:"). Only tasks with a flat prompt support it."""
    dataset: str | None = None
    """Data of one's own for the sft, classification and text tasks: any ``datasets.load_dataset``
    source (a hub id, a local CSV/JSON/JSONL/Parquet file or a folder of them) or a ``save_to_disk`` folder."""
    dataset_config: str | None = None
    """The configuration (subset) of ``dataset`` to load, for a dataset that has several."""
    train_split: str = "train"
    """The split of ``dataset`` to train on."""
    dev_split: str | None = None
    """The split to draw dev examples from; None: "validation" if there is one, else carved out of the
    train split."""
    test_split: str | None = None
    """The split to draw test examples from; None: "test" if there is one, else carved out of the train
    split (with a fixed seed, like every test sample)."""
    text_column: str = "text"
    """The column holding the text: of each example (classification) or of each document (text)."""
    label_column: str = "label"
    """classification: the column holding the labels, integers (indices into ``labels``) or strings."""
    labels: list[str] = field(default_factory=list)
    """classification: the label words, in label order (e.g. "negative,positive"); each is scored as
    the continuation of the prompt, after a space."""
    label_values: list[str] = field(default_factory=list)
    """classification: the string labels of the data, in the order of ``labels`` (e.g. "neg,pos");
    empty: string labels are the label words themselves."""
    prompt_column: str = "prompt"
    """sft: the column of prompts, on rows of prompt/completion pairs (no loss on the prompt)."""
    completion_column: str = "completion"
    """sft: the column of completions, each trained followed by the tokenizer's EOS."""
    messages_column: str = "messages"
    """sft: the column of conversations (lists of {"role", "content"} turns), rendered with the model's
    chat template; loss on the assistant turns. Used when the data has it, else prompt/completion."""

    def __post_init__(self) -> None:
        for name in ("num_train", "num_dev", "num_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TaskConfig.{name} must be a non-negative integer, got {value!r}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"TaskConfig.pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.max_length < 8:
            raise ValueError(f"TaskConfig.max_length must be at least 8 tokens, got {self.max_length}")
        if self.template is not None and not self.template.strip():
            raise ValueError("TaskConfig.template is empty; leave it None to use the task's own template")
        from distzo.tasks.registry import TASKS  # late import: the registry imports this module

        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; known tasks: {', '.join(sorted(TASKS))}")
        unused = [name for name in self.changed(DATA_OPTIONS) if name not in TASKS[self.name].options]
        if unused:
            readers = ", ".join(sorted(t.name for t in TASKS.values() if unused[0] in t.options))
            raise ValueError(f"task {self.name!r} does not use task.{unused[0]} (tasks that do: {readers})")

    def changed(self, names: Sequence[str]) -> list[str]:
        """Those of the fields ``names`` that are set to something other than their defaults."""
        defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(self)}
        return [name for name in names if getattr(self, name) != defaults[name]]


class Task:
    """A task: a name, a kind (which loss and metric apply) and a loader."""

    name: str = ""
    kind: Kind = "classification"
    supports_template: bool = False
    options: tuple[str, ...] = ()
    """The ``DATA_OPTIONS`` the task reads."""

    def load(self, cfg: TaskConfig) -> TaskData:
        raise NotImplementedError

    def check_template(self, cfg: TaskConfig) -> None:
        """Refuse a template override the task would ignore: no knob may silently do nothing."""
        if cfg.template is not None and not self.supports_template:
            raise ValueError(f"task {self.name!r} does not take a prompt template override")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


def render(template: str, fields: dict) -> str:
    """``template.format(**fields)`` with an error that lists the fields a template may use."""
    try:
        return template.format(**fields)
    except KeyError as err:
        offered = ", ".join("{" + k + "}" for k in fields)
        raise ValueError(f"template field {{{err.args[0]}}} is not available; this task offers {offered}") from None


def take(records: Sequence[T], order: Sequence[int], n: int, convert: Callable[[T], R | None]) -> tuple[list[R], int]:
    """Convert records in ``order`` until ``n`` examples are made, skipping unusable ones.

    Returns the examples and how many positions of ``order`` were used, so the next split
    can continue where this one stopped and the splits stay disjoint.
    """
    out: list[R] = []
    pos = 0
    while len(out) < n and pos < len(order):
        example = convert(records[order[pos]])
        pos += 1
        if example is not None:
            out.append(example)
    if len(out) < n:
        log.warning("asked for %d examples, only %d are available", n, len(out))
    return out, pos


def shuffled(n: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends only on ``seed``."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order
