"""Reading a task's raw splits: from the Hugging Face hub, or from a local copy.

A local copy is any of
  * a folder written by ``DatasetDict.save_to_disk`` (or ``Dataset.save_to_disk``: one train split),
  * a folder of split files ``train.<ext>``, ``validation.<ext>``, ``test.<ext>``,
  * a single file, read as the train split,
with ``<ext>`` one of jsonl, json, csv, parquet. Records keep the hub's schema, so the same
template code serves the hub and local copies.

A dataset of one's own (``load_source``) is any source ``datasets.load_dataset`` reads — a hub
id, a folder of data files, a local clone of a hub repository with its configurations — or a
single file or ``save_to_disk`` folder, read as above.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

Split = Sequence[Mapping[str, Any]]

SPLITS = ("train", "validation", "test")
# How datasets refuses a split of no records (it never returns an empty one).
_NO_RECORDS = re.compile(r'Instruction "(.+)" corresponds to no data')
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_splits(hub_path: str, hub_name: str | None, data_path: str | None) -> dict[str, Split]:
    """The task's splits by name; the hub is read only when ``data_path`` is None."""
    if data_path is None:
        import datasets  # imported on use: it is slow to import and only data loading needs it

        return dict(datasets.load_dataset(hub_path, hub_name))
    return load_local(data_path)


def load_source(source: str, config: str | None) -> dict[str, Split]:
    """The splits of ``source`` by name, the configuration ``config`` of it where it has several."""
    path = Path(source).expanduser()
    if path.is_file() or _is_saved(path):
        if config is not None:
            raise ValueError(f"dataset {source!r} is a single file or saved dataset, which has no configuration "
                             f"{config!r}; leave dataset_config unset")
        return load_local(source)
    if path.exists():
        with _no_progress_bars():
            return _load_dataset(str(path), config)
    return _load_dataset(source, config)  # the hub, whose downloads keep their progress bars


def _is_saved(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _load_dataset(source: str, config: str | None) -> dict[str, Split]:
    import datasets

    try:
        return dict(datasets.load_dataset(source, config))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:  # offline, not found, bad config
        cause = str(err.__cause__ or err).strip().splitlines()[0]
        named = f"dataset {source!r}" + (f" (configuration {config!r})" if config else "")
        empty = _NO_RECORDS.search(cause)
        if empty:
            raise ValueError(f"split {empty.group(1)!r} of {named} is empty") from None
        raise ValueError(f"cannot load {named}: {cause}") from None


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """datasets draws a bar for each split it reads; from local files that is noise on stderr, where
    an error about the data must be one line."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def load_local(data_path: str) -> dict[str, Split]:
    with _no_progress_bars():
        return _read_local(data_path)


def _read_local(data_path: str) -> dict[str, Split]:
    import datasets

    path = Path(data_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data_path {str(path)!r} does not exist")
    if path.is_file():
        return {"train": _load_files({"train": path})["train"]}
    if (path / "dataset_dict.json").exists():
        return dict(datasets.load_from_disk(str(path)))
    if (path / "state.json").exists():
        return {"train": datasets.load_from_disk(str(path))}
    files = _split_files(path)
    if "train" not in files and "validation" not in files:
        raise FileNotFoundError(
            f"{str(path)!r} holds no train.* or validation.* file ({', '.join(_FORMATS)}) and no saved dataset"
        )
    return _load_files(files)


def _split_files(folder: Path) -> dict[str, Path]:
    files = {}
    for split in SPLITS:
        found = [folder / f"{split}{ext}" for ext in _FORMATS if (folder / f"{split}{ext}").is_file()]
        if found:
            files[split] = found[0]
    return files


def _load_files(files: Mapping[str, Path]) -> dict[str, Split]:
    out = {}
    for split, file in files.items():
        fmt = _FORMATS.get(file.suffix.lower())
        if fmt is None:
            raise ValueError(f"cannot read {str(file)!r}: expected one of {', '.join(_FORMATS)}")
        if fmt != "parquet":
            # datasets keeps bytes that are not UTF-8 and fails on the first access, naming no file.
            check_utf8(file)
        out[split] = _load_file(fmt, file, split)
    return out


def _load_file(fmt: str, file: Path, split: str) -> Split:
    import datasets

    try:
        return datasets.load_dataset(fmt, data_files=str(file), split="train")
    except ValueError as err:
        if _NO_RECORDS.search(str(err)):
            raise ValueError(f"split {split!r} of dataset {str(file)!r} is empty") from None
        raise
    except datasets.exceptions.DatasetGenerationError as err:
        cause = str(err.__cause__ or err).strip().splitlines()[0]
        where = _json_error(file) if fmt == "json" else None
        raise ValueError(where or f"cannot read {str(file)!r}: {cause}") from None


def _json_error(file: Path) -> str | None:
    """The first invalid JSON in ``file``, as file:line. The file is read as JSON Lines unless its
    first line is no JSON value by itself; then it is one document (datasets reads both)."""
    text = file.read_text(encoding="utf-8")
    lines = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    bad = next(((n, err) for n, line in lines if (err := _json_problem(line))), None)
    if bad is None:
        return None
    lineno, err = bad
    if lineno == lines[0][0]:
        err = _json_problem(text)
        if err is None:
            return None
        lineno = err.lineno
    return f"{file}:{lineno}: not valid JSON ({err.msg})"


def _json_problem(text: str) -> json.JSONDecodeError | None:
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return err
    return None


def utf8_lines(path: Path, opener: Callable[..., Any] = open) -> Iterator[str]:
    """The lines of ``path`` (opened with ``opener``) as text, endings kept; ValueError naming the
    line of the first byte that is not UTF-8. Splitting at b"\\n" is safe: no UTF-8 sequence holds it."""
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                where = f"{path}:{lineno}"
                raise ValueError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start + 1} of the line)") from None


def check_utf8(path: Path) -> None:
    """ValueError naming the line of the first byte of ``path`` that is not UTF-8."""
    for _ in utf8_lines(path):
        pass
