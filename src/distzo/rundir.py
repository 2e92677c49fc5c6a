"""A run's output folder: what it holds, who may write it, and what a resume may change.

One process writes a run (rank 0 under torchrun). It holds an exclusive ``flock`` on
``<output_dir>/.distzo.lock`` from before its first write until it exits; the kernel drops
the lock when the process dies, so a crash leaves no stale lock. A second writer is refused
with one line.

A folder is in one of four states, read without changing anything:

* absent or empty (a lock file alone counts as empty): a fresh run may start;
* a run: a trajectory log with its header and/or ``checkpoints/``; only ``--resume`` continues it;
* something else (a user's own files): refused, so nothing of theirs is overwritten;
* not a folder, or below a file, or not writable: refused before anything is loaded.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_FILE = ".distzo.lock"
LOG_FILE = "trajectory.jsonl"
CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"

# Settings a resumed run may change: they decide how the run is watched, saved, published and
# spread over devices, never which updates it makes (the engines are exact in every mode), except
# ``steps``, which extends or shortens the run (each step's lr is logged, so replay stays exact).
RESUMABLE = (
    "steps", "resume", "eval_every", "save_every", "log_every", "eval_batch_size", "progress", "report_to",
    "time_limit_minutes", "max_skipped_steps", "zero_shot", "test_at_best", "output_dir", "push_to_hub",
    "push_checkpoint",
    "model.device", "model.cache_dir", "parallel.", "offload.", "optim.cuda_graphs",
)


class OutputInUse(FileExistsError):
    """Another live process holds the output folder's lock."""


@dataclass(frozen=True)
class FolderState:
    """What an output folder holds, as read from disk."""

    kind: str
    """absent | empty | run | other"""
    has_log: bool = False
    has_checkpoints: bool = False


def inspect(out: Path) -> FolderState:
    """Classify ``out`` (read-only); OSError with a clear message when it cannot be a run folder."""
    if not out.exists():
        _check_creatable(out)
        return FolderState("absent")
    if not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the output path exists and is not a folder", str(out))
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE]
    has_log = (out / LOG_FILE).is_file() and (out / LOG_FILE).stat().st_size > 0
    has_checkpoints = (out / CHECKPOINTS).is_dir()
    if has_log or has_checkpoints:
        return FolderState("run", has_log, has_checkpoints)
    return FolderState("other" if entries else "empty")


def _check_creatable(out: Path) -> None:
    """The nearest existing ancestor must be a writable folder (else mkdir fails later, after loading)."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the output path lies below a file", str(parent))
    require_writable(parent)


def require_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "the output folder is not writable", str(folder))


class RunLock:
    """An exclusive, process-lifetime lock on an output folder."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self._fd: int | None = None

    def probe(self) -> None:
        """Refuse early (before a model is loaded) when a live writer holds the lock; creates nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            self._try_lock(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._try_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        # The file stays: unlinking it would let a third process lock a new inode while a
        # second one still waits on the old one.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _try_lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split() or ["?"]
            where = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "")
            raise OutputInUse(
                f"output directory '{self.path.parent}' is in use by another distzo run ({where}); "
                "wait for it to finish or choose another --output-dir"
            ) from None


# ---------------------------------------------------------------- resume


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(saved: dict[str, Any], requested: dict[str, Any]) -> tuple[dict, dict]:
    """(accepted, refused) changes between two config dicts, each as {dotted field: [old, new]}."""
    before, after = flatten(saved), flatten(requested)
    changes = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k)}
    refused = {k: v for k, v in changes.items() if not _resumable(k)}
    accepted = {k: v for k, v in changes.items() if _resumable(k) and k not in ("resume", "output_dir")}
    return accepted, refused


def _resumable(name: str) -> bool:
    return any(name == r or (r.endswith(".") and name.startswith(r)) for r in RESUMABLE)
