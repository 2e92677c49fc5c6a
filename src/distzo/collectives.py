"""Collectives with a deadline: a lost peer becomes one ParallelError, not a hang or an abort.

NCCL's own blocking wait (TORCH_NCCL_BLOCKING_WAIT) also enforces the process group's
timeout, but it checks for completion once per millisecond: a step that waits on a
collective of a few bytes pays up to a millisecond for it, and sliced offload waits on
one gather per block. ``wait`` polls the work every few microseconds instead, gives up
at the deadline, and reports every failure the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

POLL_S = 20e-6  # between completion checks: well below a collective's own latency


class ParallelError(RuntimeError):
    """A collective failed: a peer died, hung past the timeout, or the job is misconfigured."""


def checked(rank: int, timeout_s: float, what: str, fn: Callable[[], object]):
    """``fn()``, with any backend failure reported as a ParallelError that names the rank."""
    try:
        return fn()
    except ParallelError:
        raise
    except Exception as exc:  # backend errors differ (DistBackendError, RuntimeError): report them as one
        raise failure(rank, timeout_s, what, exc) from exc


def run(start: Callable[[], object], rank: int, timeout_s: float, what: str) -> None:
    """Start an asynchronous collective (``start()`` returns its work) and wait for it."""
    wait(checked(rank, timeout_s, what, start), rank, timeout_s, what)


def wait(work, rank: int, timeout_s: float, what: str) -> None:
    """Wait for an asynchronous collective's ``work`` until it completes or ``timeout_s`` passes.

    On CUDA the collective's completion is its kernel's end; afterwards the current stream
    is ordered after it (``work.wait()`` returns at once then). A peer that died or hung
    leaves the work pending: ParallelError at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise failure(rank, timeout_s, what, TimeoutError(f"no answer after {timeout_s:g} s"))
        time.sleep(POLL_S)
    checked(rank, timeout_s, what, work.wait)  # raises what the backend saw, if anything


def failure(rank: int, timeout_s: float, what: str, exc: BaseException) -> ParallelError:
    lines = str(exc).strip().splitlines()
    detail = lines[0] if lines else type(exc).__name__
    return ParallelError(
        f"rank {rank}: {what} failed: another rank died or did not answer within {timeout_s:g} s ({detail[:200]})"
    )


@dataclass
class SliceGroup:
    """The ranks of one node that share one host copy of the blocks (sliced offload)."""

    group: object  # a torch.distributed process group of this node's ranks
    rank: int
    size: int
    shared_dir: str = "/dev/shm"
    tag: str = "distzo"
    timeout_s: float = 600.0
    """A peer that has not joined a gather or barrier by then has died or hung."""

    def run(self, start: Callable[[], object], what: str) -> None:
        """Start an asynchronous collective and wait for it (both fail as one ParallelError)."""
        run(start, torch.distributed.get_rank(), self.timeout_s, what)

    def start(self, start: Callable[[], object], what: str):
        """Start an asynchronous collective: NCCL may report a lost peer here already."""
        return checked(torch.distributed.get_rank(), self.timeout_s, what, start)

    def wait(self, work, what: str) -> None:
        wait(work, torch.distributed.get_rank(), self.timeout_s, what)

    def barrier(self, what: str) -> None:
        self.run(lambda: torch.distributed.barrier(self.group, async_op=True), what)
