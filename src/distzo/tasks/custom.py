"""Tasks on a dataset of one's own (``distzo.tasks.user_data``): classification and SFT.

classification: the prompt is a template over the record's columns, the candidates are the
label words the user names, each after a space, as the built-in tasks verbalise theirs
(" negative" after "Sentiment:"). Labels in the data are indices into the label words or
strings: the words themselves, or the ``label_values`` listed in the same order.

sft: rows are conversations (a messages column, rendered with the model's chat template in
collate, loss on the assistant turns) or prompt/completion pairs (loss on the completion and
the EOS that follows it), as TRL's SFTTrainer reads them.
"""

from __future__ import annotations

import string
from typing import Any, Callable

from distzo.tasks.base import Example, Task, TaskConfig, TaskData, render
from distzo.tasks.user_data import SOURCE_OPTIONS, Record, UserData, source_of

DEFAULT_TEMPLATE = "{{{column}}}\nLabel:"  # the text column, then the label word after "Label:"


class Classification(Task):
    """Candidate loss and accuracy over label words chosen by the user."""

    name = "classification"
    kind = "classification"
    supports_template = True
    options = SOURCE_OPTIONS + ("text_column", "label_column", "labels", "label_values")

    def load(self, cfg: TaskConfig) -> TaskData:
        source = source_of(cfg)
        words = label_words(cfg, source)
        data = UserData.load(source, cfg)
        template = prompt_template(cfg, data)
        data.require([cfg.label_column])
        index = label_index(words, [v.strip() for v in cfg.label_values], cfg.label_column, source)
        for value in data.values(cfg.label_column):  # every label is checked, not only those sampled
            index(value)
        candidates = [" " + word for word in words]

        def convert(record: Record, where: str) -> Example:
            prompt = render(template, dict(record))
            return Example(prompt=prompt, candidates=list(candidates), gold=index(record[cfg.label_column]))

        return data.sample(cfg, convert)


def prompt_template(cfg: TaskConfig, data: UserData) -> str:
    """``cfg.template``, or the default over ``text_column``, once the columns it names are known to be there."""
    if cfg.template is None:
        data.require([cfg.text_column])
        return DEFAULT_TEMPLATE.format(column=cfg.text_column)
    fields = placeholders(cfg.template, data.source)
    data.require(fields, "column for the template placeholder")
    if cfg.changed(("text_column",)) and cfg.text_column not in fields:
        raise ValueError(f"classification of dataset {data.source!r}: the template {cfg.template!r} does not use "
                         f"text_column {cfg.text_column!r}; name the column in the template or drop text_column")
    return cfg.template


def label_words(cfg: TaskConfig, source: str) -> list[str]:
    """The label words, stripped (the space before each is the candidate's own)."""
    words = [w.strip() for w in cfg.labels]
    if len(words) < 2 or not all(words):
        raise ValueError(f"classification of dataset {source!r} needs labels: at least 2 label words "
                         f'("negative,positive"), got {cfg.labels!r}')
    if len(set(words)) < len(words):
        raise ValueError(f"classification of dataset {source!r}: the labels {words!r} repeat a word")
    if cfg.label_values and len(cfg.label_values) != len(words):
        raise ValueError(f"classification of dataset {source!r}: label_values {cfg.label_values!r} must list "
                         f"one value per label word {words!r}")
    return words


def label_index(words: list[str], values: list[str], column: str, source: str) -> Callable[[Any], int]:
    """A label of the data to its index in ``words``: an index already, one of the words, or one of
    ``values`` (then the only labels accepted); ValueError naming a label that is none of these."""
    names = values or words
    if values:
        choices = "one of label_values " + ", ".join(names)
    else:
        choices = f"an index 0..{len(names) - 1} or one of the labels " + ", ".join(names)

    def index(value: Any) -> int:
        if isinstance(value, str) and value in names:
            return names.index(value)
        if isinstance(value, int) and not values and 0 <= value < len(names):
            return int(value)
        raise ValueError(f"dataset {source!r}: label {value!r} in column {column!r} is not {choices}")

    return index


def placeholders(template: str, source: str) -> list[str]:
    """The columns a template's {placeholders} name."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"template {template!r} for dataset {source!r} is not a format string: {err}") from None
    return [name.split(".")[0].split("[")[0] for name in fields]


class SFT(Task):
    """Supervised fine-tuning on conversations or prompt/completion pairs; evaluated by mean token loss."""

    name = "sft"
    kind = "lm"
    options = SOURCE_OPTIONS + ("prompt_column", "completion_column", "messages_column")

    def load(self, cfg: TaskConfig) -> TaskData:
        self.check_template(cfg)
        source = source_of(cfg)
        pairs = bool(cfg.changed(("prompt_column", "completion_column")))
        if pairs and cfg.changed(("messages_column",)):
            raise ValueError(f"sft on dataset {source!r} reads a messages column or prompt/completion columns, "
                             "not both; set one of them")
        data = UserData.load(source, cfg)
        if not pairs and (cfg.messages_column in data.columns or cfg.changed(("messages_column",))):
            data.require([cfg.messages_column])
            return data.sample(cfg, lambda record, where: conversation(record[cfg.messages_column], where))
        data.require([cfg.prompt_column, cfg.completion_column])
        columns = (cfg.prompt_column, cfg.completion_column)
        return data.sample(cfg, lambda record, where: completion(record, columns, where))


def conversation(turns: Any, where: str) -> Example:
    """A list of {"role", "content"} turns with at least one assistant turn, as a chat example."""
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in turns
    ):
        raise ValueError(f'{where}: messages must be a list of {{"role": ..., "content": ...}} turns with text')
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError(f"{where}: the conversation has no assistant turn, so there is nothing to train on")
    # Arrow gives every turn each key that any turn has, None where it had none; chat
    # templates test whether a key is there, so the Nones are dropped.
    return Example(messages=[{k: v for k, v in t.items() if v is not None} for t in turns])


def completion(record: Record, columns: tuple[str, str], where: str) -> Example:
    """A prompt/completion pair; the completion is trained followed by EOS."""
    prompt, target = (record[c] for c in columns)
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise ValueError(f"{where}: columns {columns[0]!r} and {columns[1]!r} must hold text "
                         "(conversations go in a messages column)")
    if not target:
        raise ValueError(f"{where}: the completion is empty, so there is nothing to train on")
    return Example(prompt=prompt, target=target, eos=True)
