"""Reading a task's raw splits: from the Hugging Face hub, or from a local copy.

A local copy is any of
  * a folder written by ``DatasetDict.save_to_disk`` (or ``Dataset.save_to_disk``: one train split),
  * a folder of split files ``train.<ext>``, ``validation.<ext>``, ``test.<ext>``,
  * a single file, read as the train split,
with ``<ext>`` one of jsonl, json, csv, parquet. Records keep the hub's schema, so the same
template code serves the hub and local copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

Split = Sequence[Mapping[str, Any]]

SPLITS = ("train", "validation", "test")
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_splits(hub_path: str, hub_name: str | None, data_path: str | None) -> dict[str, Split]:
    """The task's splits by name; the hub is read only when ``data_path`` is None."""
    if data_path is None:
        import datasets  # imported on use: it is slow to import and only data loading needs it

        return dict(datasets.load_dataset(hub_path, hub_name))
    return load_local(data_path)


def load_local(data_path: str) -> dict[str, Split]:
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
    import datasets

    out = {}
    for split, file in files.items():
        fmt = _FORMATS.get(file.suffix.lower())
        if fmt is None:
            raise ValueError(f"cannot read {str(file)!r}: expected one of {', '.join(_FORMATS)}")
        out[split] = datasets.load_dataset(fmt, data_files=str(file), split="train")
    return out
