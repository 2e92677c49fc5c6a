"""Perturbation, direction and data parallelism over one named DeviceMesh.

    torchrun --nproc-per-node 2 -m distzo.cli train --parallel.pert 2      # +eps / -eps on paired GPUs
    torchrun --nproc-per-node 8 -m distzo.cli train --parallel.dir 2       # dir=2 x data=4
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --master-addr HOST --master-port 29500 \\
        -m distzo.cli train --parallel.pert 2                              # pert=2 x data=8

Every rank derives the same plan of probes (``distzo.algorithms``), so a step needs no
weights on the wire: each rank measures the probes it is responsible for and one all-reduce
of a zero-filled float64 array of shape (forwards, probes, 2) — per probe, (sum of loss x
weight, sum of weight) — hands every rank every loss of the plan. Every rank then applies
the same update record to its own copy of the weights, which therefore stay identical.

Axes (sizes multiply to the world size; ``data = 0`` takes what is left):
    pert   probe k of a forward is measured by pert-rank k % pert. For MeZO's pair and pert = 2,
           pert-rank 0 measures L(theta + eps z), pert-rank 1 the other probe: one forward of
           R rows each instead of one of 2R rows.
    dir    forward i of a plan (MeZO: direction i) is measured by dir-rank i % dir (the number
           of forwards need not be a multiple).
    data   each rank measures the same probes on its own contiguous shard of the global batch;
           shard losses are combined with weights so the result is the global batch's loss.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distzo import collectives
from distzo.collectives import ParallelError, SliceGroup
from distzo.losses import IGNORE_INDEX

__all__ = ["AXES", "Mesh", "ParallelConfig", "ParallelError", "assemble", "init", "loss_weight", "my_probes",
           "node_slices", "shard_batch", "shard_bounds", "world_size"]

AXES = ("pert", "dir", "data")
# Keys of a candidate batch that hold one entry per example rather than per row.
EXAMPLE_KEYS = ("gold", "num_candidates", "candidate_ids")


@dataclass
class ParallelConfig:
    """How the ranks of a torchrun job split a step. Ignored in a single process."""

    pert: int = 1
    """Perturbation parallelism: ranks that measure different probes of one forward (2: MeZO's pair on two ranks)."""
    dir: int = 1
    """Direction parallelism: ranks that measure different directions (optim.directions) of a step."""
    data: int = 0
    """Data parallelism: ranks that split the global batch; 0 = the rest of the world size."""
    timeout_s: float = 600.0
    """A collective (or a wait for rank 0's eval or save) that takes longer fails the job."""

    def __post_init__(self) -> None:
        if self.pert < 1:
            raise ValueError(f"parallel.pert must be >= 1, got {self.pert}")
        if self.dir < 1:
            raise ValueError(f"parallel.dir must be >= 1, got {self.dir}")
        if self.data < 0:
            raise ValueError(f"parallel.data must be >= 0 (0 = the rest of the world size), got {self.data}")
        if not self.timeout_s > 0:
            raise ValueError(f"parallel.timeout_s must be > 0, got {self.timeout_s}")

    def sizes(self, world_size: int) -> dict[str, int]:
        """The size of each axis for ``world_size`` ranks; ValueError unless they multiply to it."""
        fixed = self.pert * self.dir
        data = self.data or world_size // fixed
        if data < 1 or fixed * data != world_size:
            shown = self.data or "rest"
            raise ValueError(
                f"parallel.pert x parallel.dir x parallel.data = {self.pert} x {self.dir} x {shown} "
                f"does not match the world size {world_size}"
            )
        return {"pert": self.pert, "dir": self.dir, "data": data}


@dataclass
class Mesh:
    """This rank's place in the ("pert", "dir", "data") mesh, and the collectives a step uses.

    ``bytes_sent`` counts the payload this rank has handed to collectives, so the claim
    "only scalars cross the network" can be checked.
    """

    sizes: dict[str, int] = field(default_factory=lambda: {a: 1 for a in AXES})
    coords: dict[str, int] = field(default_factory=lambda: {a: 0 for a in AXES})
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 600.0
    device_mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh when world_size > 1
    bytes_sent: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def size(self, axis: str) -> int:
        return self.sizes[axis]

    def coord(self, axis: str) -> int:
        return self.coords[axis]

    def group(self, axis: str):
        """The process group of this rank's line along ``axis`` (None in a single process)."""
        return self.device_mesh.get_group(axis) if self.device_mesh is not None else None

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` over every rank of the mesh (identity in a single process)."""
        if not self.distributed:
            return values
        buf = values.to(self.device)
        self.bytes_sent += buf.numel() * buf.element_size()
        collectives.run(lambda: dist.all_reduce(buf, async_op=True), self.rank, self.timeout_s, "all-reduce")
        return buf.cpu()

    def barrier(self) -> None:
        """Wait for every rank (for rank 0's eval or save), within the timeout."""
        if self.distributed:
            collectives.run(lambda: dist.barrier(async_op=True), self.rank, self.timeout_s, "barrier")

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def world_size() -> int:
    """The number of ranks torchrun launched (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(cfg: ParallelConfig | None = None, device: str = "auto") -> Mesh:
    """The mesh of this process; initialises the process group from torchrun's environment.

    ``device`` is where the model lives ("cuda", "cpu" or "auto"): CUDA ranks use NCCL on
    GPU ``LOCAL_RANK``, CPU ranks gloo. One process gets a trivial mesh and no process group.
    """
    cfg = cfg or ParallelConfig()
    # NVLink SHARP (multicast) buys nothing for all-reduces of a few bytes: keep it off.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    world = world_size()
    sizes = cfg.sizes(world)
    if world == 1:
        return Mesh(sizes=sizes, timeout_s=cfg.timeout_s)
    target = _device(device)
    if not dist.is_initialized():
        _init_process_group(target, cfg.timeout_s)
    from torch.distributed.device_mesh import init_device_mesh

    device_mesh = init_device_mesh(target.type, tuple(sizes[a] for a in AXES), mesh_dim_names=AXES)
    coords = dict(zip(AXES, device_mesh.get_coordinate()))
    return Mesh(sizes=sizes, coords=coords, rank=dist.get_rank(), world_size=world, device=target,
                timeout_s=cfg.timeout_s, device_mesh=device_mesh)


def _device(name: str) -> torch.device:
    wants_cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return torch.device("cpu")
    local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= gpus:  # CUDA's own word for it is "invalid device ordinal", from deep inside set_device
        raise ParallelError(f"local rank {local} has no GPU of its own: this node has {gpus}; start one process "
                            f"per GPU (torchrun --nproc-per-node {gpus}), or run the ranks on the CPU (--device cpu)")
    torch.cuda.set_device(local)  # so "cuda" (the model's device) means this rank's GPU
    return torch.device("cuda", local)


def _init_process_group(device: torch.device, timeout_s: float) -> None:
    timeout = timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {"timeout": timeout}
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0 and os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
        # torchrun keeps one store across restarts, and a restarted rank can read a dead
        # rank's address from the last attempt (pytorch/pytorch#135712). On one node every
        # rank has the same restart count: give each attempt its own keys. (Several nodes:
        # run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, see docs/distributed.md.)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        kwargs.update(store=dist.PrefixStore(f"distzo/attempt_{restart}", store), rank=rank, world_size=world)
    if device.type == "cuda":
        # Blocking wait turns a timed-out collective into an exception in this thread
        # (a one-line error) instead of an abort from NCCL's watchdog.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        dist.init_process_group("nccl", device_id=device, **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)


def node_slices(mesh: Mesh) -> SliceGroup | None:
    """This node's ranks, which share one host copy of offloaded blocks (None in one process)."""
    if not mesh.distributed:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", mesh.world_size))
    group, _ = dist.new_subgroups(group_size=local)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    port = os.environ.get("MASTER_PORT", "0")
    return SliceGroup(group, dist.get_rank(group), local, tag=f"distzo-{run}-{port}-{attempt}",
                      timeout_s=mesh.timeout_s)


# ---------------------------------------------------------------- what a rank measures


def my_probes(mesh: Mesh | None, forwards) -> list[list[tuple[int, int]]]:
    """Per forward i of the plan, the (i, k) of the probes this rank measures: forward i on
    dir-rank i % dir, its probe k on pert-rank k % pert."""
    dirs, pert = (1, 1) if mesh is None else (mesh.size("dir"), mesh.size("pert"))
    d, r = (0, 0) if mesh is None else (mesh.coord("dir"), mesh.coord("pert"))
    return [[(i, k) for k in range(len(f.probes)) if k % pert == r] if i % dirs == d else []
            for i, f in enumerate(forwards)]


def assemble(mesh: Mesh | None, measured: Mapping[tuple[int, int], float], shape: list[int],
             weight: float) -> list[list[float]]:
    """Every loss of the step, ``losses[i][k]`` for forward i's probe k (``shape[i]`` probes),
    from this rank's ``measured`` and its peers'.

    ``weight`` is this rank's share of the global batch in the loss's own units (see
    ``loss_weight``); the combined loss is sum(loss x weight) / sum(weight) over the
    data ranks. In a single process the losses pass through untouched.
    """
    if mesh is None or not mesh.distributed:
        return [[measured[i, k] for k in range(n)] for i, n in enumerate(shape)]
    slots = torch.zeros(len(shape), max(shape, default=0), 2, dtype=torch.float64)
    for (i, k), loss in measured.items():
        # A shard with no label tokens has no loss (NaN): it carries no weight either.
        slots[i, k] = torch.tensor([loss * weight if weight else 0.0, weight], dtype=torch.float64)
    total = mesh.all_reduce_sum(slots)
    losses = (total[..., 0] / total[..., 1]).tolist()
    return [row[:n] for row, n in zip(losses, shape)]


# ---------------------------------------------------------------- the data axis


def shard_bounds(examples: int, count: int) -> list[int]:
    """Contiguous, near-equal shards: shard i holds examples [b[i], b[i+1])."""
    if examples < count:
        raise ValueError(f"a batch of {examples} examples cannot be split over {count} data ranks")
    return [examples * i // count for i in range(count + 1)]


def shard_batch(batch: Mapping[str, Any], index: int, count: int) -> dict[str, Any]:
    """Data rank ``index``'s part of a collated global batch: whole examples, in order.

    Candidate batches with one row per (example, candidate) keep each example's rows
    together. Slicing the collated batch (rather than collating each shard) keeps every
    row exactly as the single-process batch has it, padding included.
    """
    if count == 1:
        return dict(batch)
    rows = batch["input_ids"].shape[0]
    if "num_candidates" in batch and "candidate_ids" not in batch:  # a row per (example, candidate)
        per_example = batch["num_candidates"].tolist()
        starts = [0]
        for n in per_example:
            starts.append(starts[-1] + n)
    else:
        per_example = range(rows)
        starts = list(range(rows + 1))
    bounds = shard_bounds(len(per_example), count)
    lo, hi = bounds[index], bounds[index + 1]
    out = {}
    for key, value in batch.items():
        if not torch.is_tensor(value) or value.ndim == 0:
            out[key] = value
        elif key in EXAMPLE_KEYS:
            out[key] = value[lo:hi]
        elif value.shape[0] == rows:
            out[key] = value[starts[lo] : starts[hi]]
        else:
            raise ValueError(f"batch key '{key}' has {value.shape[0]} rows, not {rows}: cannot shard it")
    return out


def loss_weight(batch: Mapping[str, Any]) -> float:
    """How much of the global batch's loss a shard carries, in the loss's units.

    distzo's losses are means: the candidate loss over examples (batches with ``gold``),
    the LM loss over label tokens (labels[:, 1:] != IGNORE_INDEX; input_ids when no labels).
    """
    if "gold" in batch:
        return float(len(batch["gold"]))
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
    return float((labels[:, 1:] != IGNORE_INDEX).sum())
