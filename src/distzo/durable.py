"""Durable writes: a file or folder is on the disk, not only in the page cache, before a rename
publishes it (checkpoints, converted models)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``folder`` durable (a no-op where unsupported)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under ``folder``.

    Writers such as ``save_pretrained`` leave data in the page cache; publishing the folder
    by rename before it reaches the disk could, after a power loss, expose empty files
    under a name that claims to be complete.
    """
    root = Path(folder)
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)
