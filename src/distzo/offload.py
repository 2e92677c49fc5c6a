"""Offloading: the decoder blocks live in pinned host memory and stream through the GPU.

    model = build_on_meta(config)                                   # or any loaded model
    engine = OffloadEngine(model, "cuda", OffloadConfig("cpu"))
    opt = ZOOptimizer(model, lr=1e-6, offload=engine)

Each block of the model's layer stack keeps its parameters in one flat host buffer
(pinned with ``cudaHostRegister``, so copies are asynchronous and run at full PCIe
speed, and no power-of-two rounding wastes host memory). Everything else (embeddings,
final norm, head) stays on the GPU. When the forward reaches a block, a forward
pre-hook binds the block's parameters to a GPU *slot* the block was uploaded into
ahead of time; a forward hook gives the slot back. Per step, each block crosses
PCIe once up, and goes back down with every ``write_every``-th update:

    upload stream   H2D copy of block k+1 (and up to ``prefetch`` ahead, cyclically, so the
                    next step's first block is on its way while the head runs)
    compute stream  block k: the pending update and both shadows in one fused pass
                    (``ZOOptimizer._shadow``), then the two perturbed streams
    offload stream  D2H copy of each parameter of block k as soon as its update is applied
                    (when a write-back is due); that is at the start of the block, so it
                    overlaps block k's compute. Between write-backs the engine keeps the
                    updates the host copy lacks and re-applies them when the block comes up.

Streams are ordered with events only; the host never blocks. A slot is reused once its
previous block has finished computing and its write-backs have landed, which with
``prefetch + 1`` slots keeps the upload stream busy back to back.

With ``slices`` (a ``SliceGroup``: the GPUs of one node) the host buffers are one shared
copy per node; each rank uploads 1/P of every block over its own PCIe link and the
slices are all-gathered over NVLink; each rank writes back only its own slice (all ranks
hold the same updated block, so the slices make the whole).

With ``gpu_memory`` the engine measures the first step's peak and then keeps as many
blocks resident as the budget leaves room for (evenly spaced through the stack), which
takes them out of the transfer volume without changing a single result.

Blocks quantized by bitsandbytes (QLoRA's base: 4-bit or int8 codes with their scales) are
frozen: every tensor the block's forward reads, whatever its dtype, is a byte range of one
uint8 host buffer (``FrozenBlock``), the parameters' codes and the scales held by their
quantization state alike, and binding a slot rebinds them all. The block's trainable
parameters (the LoRA adapters) never enter it: they stay on the GPU, so such a block only
ever goes up, and nothing is written back or re-applied for it; sliced, each rank uploads its
slice of those bytes and the gather rebuilds the block.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from distzo.collectives import SliceGroup
from distzo.directions import stable_key
from distzo.records import UpdateRecord
from distzo.units import UnsupportedModel, layer_stacks

MODES = ("none", "cpu")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
ALIGN = 512  # bytes; the CUDA caching allocator's alignment
PAGE = 1 << 21  # host buffers are whole (huge-page sized) pages
# Share of the budget left unplanned: the caching allocator's fragmentation and batches
# somewhat longer than the first one.
BUDGET_MARGIN = 0.05

InitFn = Callable[[str, torch.Tensor], None]
Reapply = Callable[[nn.Parameter, UpdateRecord], None]


def parse_bytes(text: str | int | float | None) -> int | None:
    """``"18GiB"`` -> 19327352832; ``""``/None -> None. Decimal (GB) and binary (GiB) units."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"'{text}' is not a memory size (use e.g. 18GiB, 16GB or 500MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class OffloadConfig:
    """Where the decoder blocks live between their turns on the GPU."""

    mode: str = "none"
    """none | cpu (blocks in pinned host memory, streamed through the GPU every step)"""
    gpu_memory: str = ""
    """GPU memory budget, e.g. 18GiB: after the first step, as many blocks as fit stay on the GPU ('' = stream all)."""
    prefetch: int | None = None
    """Blocks uploaded ahead of the one computing (each costs one block of GPU memory; 0 = no overlap).
    None: 1 on one GPU, 2 with sliced offload, where a block also waits for its slices' gather."""
    write_every: int = 4
    """Copy a parameter back to host memory with every N-th update; in between, the updates its host copy
    lacks are re-applied on the GPU each time its block comes up (exact: same kernel, order and rounding)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"offload.mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError(f"offload.prefetch must be >= 0, got {self.prefetch}")
        if self.write_every < 1:
            raise ValueError(f"offload.write_every must be >= 1, got {self.write_every}")
        budget = parse_bytes(self.gpu_memory)
        if budget is not None and budget <= 0:
            raise ValueError(f"offload.gpu_memory must be positive, got '{self.gpu_memory}'")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


# ---------------------------------------------------------------- host memory


def pin(t: torch.Tensor) -> None:
    """Page-lock ``t``'s memory in place (no copy, no rounding), for async full-speed copies."""
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 1))
    if err != 0:
        raise RuntimeError(f"cudaHostRegister failed with CUDA error {err} (host memory exhausted or locked?)")


def unpin(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def _unpin_all(buffers: list[torch.Tensor]) -> None:
    """Unregister before the memory can be freed: a freed, still-registered range that
    malloc hands out again cannot be registered a second time."""
    for buf in buffers:
        unpin(buf)
    buffers.clear()


def _page_aligned(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer that owns every page it touches: registered pages are never shared with
    other allocations (registering a page twice fails), and whole pages are registered."""
    nbytes = -(-numel * dtype.itemsize // PAGE) * PAGE
    # zeros: every page is touched by all cores first; registering present pages is
    # several times faster than letting cudaHostRegister fault them in one by one.
    raw = torch.zeros(nbytes + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    return raw[start : start + nbytes].view(dtype)[:numel]


def _host_buffer(numel: int, dtype: torch.dtype, pinned: bool, shared: str | None, create: bool) -> torch.Tensor:
    if shared is None:
        buf = _page_aligned(numel, dtype) if pinned else torch.empty(numel, dtype=dtype)
    else:  # a file in shared memory, mapped by every rank of the node
        if create:
            with open(shared, "wb") as f:
                f.truncate(numel * dtype.itemsize)
        buf = torch.from_file(shared, shared=True, size=numel, dtype=dtype)
        if create and pinned:
            buf.zero_()
    if pinned:
        pin(buf)
    return buf


# ---------------------------------------------------------------- streams


class _Copies:
    """Copies on an upload and an offload stream ordered by events (CUDA); plain copies on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.up = torch.cuda.Stream(device)
            self.down = torch.cuda.Stream(device)

    def mark(self):
        """An event at the current point of the compute stream."""
        return torch.cuda.current_stream(self.device).record_event() if self.cuda else None

    def wait(self, events) -> None:
        """Make the compute stream wait for ``events``."""
        for ev in events:
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)

    @contextlib.contextmanager
    def on(self, stream_name: str, after) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        stream = getattr(self, stream_name)
        for ev in after:
            if ev is not None:
                stream.wait_event(ev)
        with torch.cuda.stream(stream):
            yield

    def record(self, stream_name: str):
        return getattr(self, stream_name).record_event() if self.cuda else None

    def synchronize(self) -> None:
        if self.cuda:
            self.up.synchronize()
            self.down.synchronize()


# ---------------------------------------------------------------- blocks


@dataclass
class _Entry:
    param: nn.Parameter
    name: str
    offset: int
    numel: int
    shape: torch.Size


class HostBlock:
    """One offloaded block: its parameters as views of one flat host buffer."""

    def __init__(self, index: int, name: str, module: nn.Module, entries: list[_Entry], flat: torch.Tensor):
        self.index, self.name, self.module = index, name, module
        self.entries, self.flat = entries, flat
        self.by_param = {id(e.param): e for e in entries}
        self.host_ready = None  # event: the last write-back into ``flat`` has landed
        # id(parameter) -> the updates applied on the GPU that its host copy does not have yet
        self.stale: dict[int, list[UpdateRecord]] = {}
        self.updates: dict[int, int] = {}  # id(parameter) -> updates applied so far

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def bind(self, flat: torch.Tensor) -> None:
        for e in self.entries:
            e.param.data = flat[e.offset : e.offset + e.numel].view(e.shape)

    def bind_host(self) -> None:
        self.bind(self.flat)


@dataclass
class _Bytes:
    """A frozen tensor of a quantized block: a byte range of the block's buffer, and every attribute
    holding the tensor (a parameter's ``data``, a quantization state's ``absmax``, ...)."""

    holders: list[tuple[object, str]]
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


class FrozenBlock(HostBlock):
    """An offloaded block without trainable parameters in it: its tensors as byte ranges of one
    uint8 buffer. It has no entries, so nothing of it is ever written back or caught up."""

    def __init__(self, index: int, name: str, module: nn.Module, tensors: list[_Bytes], flat: torch.Tensor):
        super().__init__(index, name, module, [], flat)
        self.tensors = tensors

    def bind(self, flat: torch.Tensor) -> None:
        for t in self.tensors:
            view = t.view(flat)
            for owner, attr in t.holders:
                setattr(owner, attr, view)


@dataclass
class _Slot:
    buf: torch.Tensor
    free_after: list  # events the next upload into this slot must wait for


class OffloadEngine:
    """Streams a model's layer-stack blocks through ``device`` from pinned host memory."""

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device,
        cfg: OffloadConfig | None = None,
        init: InitFn | None = None,
        slices: SliceGroup | None = None,
        pinned: bool | None = None,
    ):
        self.cfg = cfg or OffloadConfig("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model, self.slices = model, slices
        self.budget = parse_bytes(self.cfg.gpu_memory)
        self.copies = _Copies(self.device)
        modules = _offloadable_blocks(model)
        self.frozen = any(_quantized(p) for _, m in modules for p in m.parameters())
        # Pageable host memory (pinned=False) is only for measuring what pinning buys.
        self.pinned = self.device.type == "cuda" if pinned is None else pinned
        self._pinned: list[torch.Tensor] = []
        # The engine holds every host buffer, so none is freed before this runs.
        self._unpin = weakref.finalize(self, _unpin_all, self._pinned)
        # A frozen block's trainable parameters stay on the GPU, with everything outside the blocks.
        owned = {id(p) for _, m in modules for p in m.parameters() if not (self.frozen and p.requires_grad)}
        self._where = _param_slots(model)
        first = slices is None or slices.rank == 0
        # The node's other ranks get the resident weights by broadcast (below) and the blocks
        # through the shared host copy: they may hold a skeleton without any weights.
        _place_resident(model, self._where, owned, self.device, init if first else _left_empty)
        build = self._frozen_block if self.frozen else self._host_block
        self.blocks = [build(i, name, m, init) for i, (name, m) in enumerate(modules)]
        if slices is not None:
            self._share_resident({id(e.param) for b in self.blocks for e in b.entries})
        self._param_block = {id(e.param): b for b in self.blocks for e in b.entries}
        self.streamed: list[HostBlock] = list(self.blocks)  # promoted blocks leave this list
        self._order = {b.index: i for i, b in enumerate(self.streamed)}
        self.block_bytes = max(b.nbytes for b in self.blocks)
        # block index -> (slot, upload event, the slices' gather or None)
        self._loaded: dict[int, tuple[_Slot, object, object]] = {}
        self._bound: dict[int, _Slot] = {}
        self._measured = self.budget is None
        if slices is not None and self.budget is not None:
            warnings.warn("offload.gpu_memory is ignored with sliced offload: every block is streamed", stacklevel=2)
            self._measured = True
        self.bytes_up = self.bytes_down = 0  # this rank's PCIe traffic, for tests and benchmarks
        self.uploads = 0
        self._written = False  # write-backs issued since the last synchronize
        self._reapply: Reapply | None = None  # see ``reapply_with``
        self.slots: list[_Slot] = []
        self.write_every = self.cfg.write_every
        self.prefetch = 0
        self.set_prefetch(self.cfg.prefetch if self.cfg.prefetch is not None else 1 if slices is None else 2)
        self._hooks = [h for b in self.blocks for h in self._install(b)]

    # ------------------------------------------------------------------ construction

    def _host_block(self, index: int, name: str, module: nn.Module, init: InitFn | None) -> HostBlock:
        params = _unique_params(module)
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) != 1:
            raise UnsupportedModel(f"block '{name}' mixes parameter dtypes {sorted(map(str, dtypes))}; "
                                   "offloading needs one dtype per block")
        # Trainable parameters first, so a block's updated part is one contiguous prefix.
        params.sort(key=lambda item: not item[1].requires_grad)
        entries, offset = [], 0
        # Every parameter starts at a multiple of ALIGN bytes, as a fresh allocation would:
        # cuBLAS picks kernels by pointer alignment, and a different kernel is different bits.
        step = max(1, ALIGN // params[0][1].element_size())
        for pname, p in params:
            entries.append(_Entry(p, f"{name}.{pname}", offset, p.numel(), p.shape))
            offset += -(-p.numel() // step) * step
        flat = self._allocate(index, self._sliceable(offset), dtypes.pop())
        for e in entries:
            view = flat[e.offset : e.offset + e.numel].view(e.shape)
            if self.slices is None or self.slices.rank == 0:
                _fill(view, e.param, e.name, init, self.device)
            # The source (if any) is freed here: never two copies on the host.
            e.param = _rehome(self._where, e.param, view)
        self._shared_filled(index)
        return HostBlock(index, name, module, entries, flat)

    def _frozen_block(self, index: int, name: str, module: nn.Module, init: InitFn | None) -> FrozenBlock:
        """The block's frozen tensors, each at a multiple of ALIGN bytes (as for ``_host_block``), in one
        uint8 buffer. They are read as they are: a quantized block is built before it is offloaded.
        Sliced, every rank holds the quantized model it loaded (a LoRA run is never a skeleton), and
        the node's first rank fills the shared copy the others then read."""
        tensors, sources, offset = [], [], 0
        for source, holders in _frozen_tensors(module):
            if source.is_meta:
                raise ValueError(f"block '{name}' holds a tensor on the meta device: quantized blocks are "
                                 "offloaded as built, without init")
            nbytes = source.numel() * source.element_size()
            tensors.append(_Bytes(holders, offset, nbytes, source.dtype, source.shape))
            sources.append(source)
            offset += -(-nbytes // ALIGN) * ALIGN
        flat = self._allocate(index, self._sliceable(offset), torch.uint8)
        if self.slices is None or self.slices.rank == 0:
            for t, source in zip(tensors, sources):
                t.view(flat).copy_(source)
        block = FrozenBlock(index, name, module, tensors, flat)
        block.bind_host()  # the sources are freed here: never two copies on the host
        self._shared_filled(index)
        return block

    def _sliceable(self, numel: int) -> int:
        """``numel`` rounded up so that the node's ranks upload equal slices of the block."""
        return numel if self.slices is None else -(-numel // self.slices.size) * self.slices.size

    def _shared_filled(self, index: int) -> None:
        """Sliced: wait until the node's first rank has filled block ``index``'s shared copy, then
        remove its file (every rank has it mapped, so nothing is left behind)."""
        if self.slices is not None:
            self.slices.barrier("loading the shared host copy")
            if self.slices.rank == 0:
                os.unlink(self._shared_path(index))

    def _allocate(self, index: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._allocate_buffer(index, numel, dtype)
        if self.pinned:
            self._pinned.append(buf)
        return buf

    def _allocate_buffer(self, index: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self.slices is None:
            return _host_buffer(numel, dtype, self.pinned, None, True)
        s = self.slices
        path = self._shared_path(index)
        if s.rank != 0:
            s.barrier("creating the shared host copy")  # wait until rank 0 created the file
        buf = _host_buffer(numel, dtype, self.pinned, path, create=s.rank == 0)
        if s.rank == 0:
            s.barrier("creating the shared host copy")
        return buf

    def _share_resident(self, blocks: set[int]) -> None:  # ids of the (re-homed) block parameters
        """Every parameter outside the blocks and every buffer, as the node's first rank has them
        (a frozen block's tensors are in the shared host copy already: not sent again)."""
        src = torch.distributed.get_global_rank(self.slices.group, 0)
        hosted = {b.flat.untyped_storage().data_ptr() for b in self.blocks}
        tensors = [p.data for _, p in self.model.named_parameters()
                   if id(p) not in blocks and p.data.untyped_storage().data_ptr() not in hosted]
        for module in self.model.modules():
            for attr, buf in module._buffers.items():
                if buf is None:
                    continue
                if buf.is_meta:  # a skeleton's (the others are on the device already)
                    buf = module._buffers[attr] = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)
                if buf.untyped_storage().data_ptr() not in hosted:
                    tensors.append(buf)
        for t in tensors:
            self.slices.run(lambda: torch.distributed.broadcast(t, src=src, group=self.slices.group, async_op=True),
                            "sharing the resident weights")

    def _shared_path(self, index: int) -> str:
        return os.path.join(self.slices.shared_dir, f"{self.slices.tag}-block{index}")

    def _install(self, block: HostBlock):
        pre = block.module.register_forward_pre_hook(lambda m, args: self._acquire(block))
        post = block.module.register_forward_hook(lambda m, args, out: self._release(block))
        return pre, post

    # ------------------------------------------------------------------ the pipeline

    def _take_slot(self) -> _Slot:
        if not self._free:  # every slot holds a block uploaded ahead: give back the furthest one
            ahead = [i for i in self._loaded if i not in self._bound]
            if not ahead:
                raise RuntimeError("offload: every GPU slot is in use (nested blocks?); raise offload.prefetch")
            self._free.append(self._unload(ahead[-1]))
        return self._free.popleft()

    def _unload(self, index: int) -> _Slot:
        """Forget a block uploaded ahead; its slot is reusable once its gather (if any) landed."""
        slot, _, gather = self._loaded.pop(index)
        if gather is not None:
            self.slices.wait(gather, "gathering a block's slices")
            slot.free_after.append(self.copies.mark())
        return slot

    def drop_prefetched(self) -> None:
        """Forget blocks uploaded ahead (call after changing host weights outside the engine)."""
        for index in [i for i in self._loaded if i not in self._bound]:
            self._free.append(self._unload(index))

    def _upload(self, block: HostBlock) -> None:
        slot = self._take_slot()
        gather = None
        with self.copies.on("up", slot.free_after + [block.host_ready]):
            if self.slices is None:
                slot.buf[: block.flat.numel()].copy_(block.flat, non_blocking=True)
                self.bytes_up += block.nbytes
            else:
                gather = self._upload_slice(block, slot.buf)
            event = self.copies.record("up")
        self.uploads += 1
        slot.free_after = []
        self._loaded[block.index] = (slot, event, gather)

    def _upload_slice(self, block: HostBlock, buf: torch.Tensor):
        """This rank's 1/P of the block over its own link; the rest from its peers over NVLink.

        The gather is asynchronous and waited for only when the block's turn comes: a
        synchronous collective would hold the host here until the block had landed, and the
        host could not queue the block computing meanwhile."""
        s, n = self.slices, block.flat.numel()
        part = n // s.size
        mine = buf[s.rank * part : (s.rank + 1) * part]
        mine.copy_(block.flat[s.rank * part : (s.rank + 1) * part], non_blocking=True)
        self.bytes_up += part * block.flat.element_size()
        return s.start(lambda: torch.distributed.all_gather_into_tensor(buf[:n], mine, group=s.group, async_op=True),
                       "gathering a block's slices")

    def _prefetch_after(self, block: HostBlock) -> None:
        """Start uploads of the blocks after ``block`` (cyclically) while slots are free."""
        count = len(self.streamed)
        start = self._order[block.index]
        for step in range(1, count):
            if not self._free:
                return
            nxt = self.streamed[(start + step) % count]
            if nxt.index not in self._loaded:
                self._upload(nxt)

    def _acquire(self, block: HostBlock) -> None:
        if block.index in self._bound or block.index not in self._order:
            return  # re-entered, or promoted to the GPU
        if block.index not in self._loaded:
            self._upload(block)
        slot, event, gather = self._loaded.pop(block.index)
        self._bound[block.index] = slot
        self._prefetch_after(block)  # before waiting: the next uploads start meanwhile
        if gather is not None:
            self.slices.wait(gather, "gathering a block's slices")  # then the compute stream follows it
        self.copies.wait([event])
        block.bind(slot.buf)
        self._catch_up(block)

    def reapply_with(self, reapply: Reapply) -> None:
        """How to apply a past update again to a parameter (the optimiser's own update path): a block
        whose host copy lacks updates (write_every > 1) gets them re-applied when it comes up."""
        self._reapply = reapply

    def _catch_up(self, block: HostBlock) -> None:
        """Re-apply on the GPU copy the updates the host copy does not have yet, oldest first."""
        for e in block.entries:
            for record in block.stale.get(id(e.param), ()):
                self._reapply(e.param, record)

    def _release(self, block: HostBlock) -> None:
        slot = self._bound.pop(block.index, None)
        if slot is None:
            return
        block.bind_host()
        slot.free_after.append(self.copies.mark())
        self._free.append(slot)

    def updated(self, param: torch.Tensor, record: UpdateRecord) -> None:
        """The optimiser applied ``record`` to ``param`` in place: copy it (this rank's slice) back
        to the host, or, between write-backs, remember that the host copy lacks ``record``."""
        block = self._param_block.get(id(param))
        if block is None or block.index not in self._bound:
            return
        count = block.updates[id(param)] = block.updates.get(id(param), 0) + 1
        stale = block.stale.setdefault(id(param), [])
        # Block i writes back at its updates n with (n + i) % write_every == 0: each step moves
        # 1/write_every of the blocks down, rather than all of them every write_every-th step.
        if (count + block.index) % self.write_every:
            stale.append(record)
            return
        stale.clear()
        self._write_back(block, block.by_param[id(param)])

    def _write_back(self, block: HostBlock, e: _Entry) -> None:
        slot = self._bound[block.index]
        lo, hi = e.offset, e.offset + e.numel
        if self.slices is not None:
            part = block.flat.numel() // self.slices.size
            lo, hi = max(lo, self.slices.rank * part), min(hi, (self.slices.rank + 1) * part)
            if lo >= hi:
                return
        with self.copies.on("down", [self.copies.mark()]):
            block.flat[lo:hi].copy_(slot.buf[lo:hi], non_blocking=True)
            event = self.copies.record("down")
        block.host_ready = event
        self._written = True
        slot.free_after.append(event)
        self.bytes_down += (hi - lo) * block.flat.element_size()

    # ------------------------------------------------------------------ outside the forward

    def block_of(self, param: torch.Tensor) -> HostBlock | None:
        """The streamed block holding ``param`` (None for parameters that live on the GPU)."""
        block = self._param_block.get(id(param))
        return block if block is not None and block.index in self._order else None

    @contextlib.contextmanager
    def holding(self, block: HostBlock | None) -> Iterator[None]:
        """Keep ``block`` on the GPU for the duration (e.g. to apply an update outside a forward)."""
        if block is None or block.index in self._bound:
            yield
            return
        self._acquire(block)
        try:
            yield
        finally:
            self._release(block)

    def synchronize(self) -> None:
        """Write back what the host copies lack and wait for every copy in flight: the host
        copies are current afterwards.

        With slices, also for the node's other ranks, which write back the other slices (every
        rank writes back after the same steps, so all of them or none reach the barrier)."""
        for block in self.streamed:
            if any(block.stale.values()):
                self._write_stale(block)
        self.copies.synchronize()
        if self.slices is not None and self._written:
            self.slices.barrier("waiting for the other slices' write-back")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the group waits on the GPU, not the host
        self._written = False

    def _write_stale(self, block: HostBlock) -> None:
        with self.holding(block):  # comes up with its missing updates re-applied
            for e in block.entries:
                if block.stale.get(id(e.param)):
                    block.stale[id(e.param)] = []
                    self._write_back(block, e)

    def after_step(self) -> None:
        """After the first step: promote as many blocks to the GPU as the budget leaves room for."""
        if self._measured:
            return
        self._measured = True
        if self.device.type != "cuda":
            return
        # The budget is what nvidia-smi shows: the CUDA context and libraries' workspaces count.
        free, total = torch.cuda.mem_get_info(self.device)
        outside = (total - free) - torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_reserved(self.device) + outside
        spare = self.budget * (1 - BUDGET_MARGIN) - peak
        per_block = self.block_bytes
        count = min(int(spare // per_block), len(self.streamed) - 1) if spare > 0 else 0
        if count > 0:
            self.promote(count)

    def promote(self, count: int) -> None:
        """Move ``count`` evenly spaced blocks to the GPU for good (results do not change)."""
        if self.slices is not None:
            return  # every rank of a node must agree; sliced runs keep streaming every block
        self.synchronize()
        self.drop_prefetched()
        n = len(self.streamed)
        chosen = {self.streamed[math.floor((i + 0.5) * n / count)].index for i in range(count)}
        for block in [b for b in self.streamed if b.index in chosen]:
            resident = block.flat.to(self.device)
            block.bind(resident)
            if any(buf is block.flat for buf in self._pinned):
                unpin(block.flat)
                self._pinned[:] = [buf for buf in self._pinned if buf is not block.flat]
            block.flat = resident.new_empty(0)
        self.streamed = [b for b in self.streamed if b.index not in chosen]
        self._order = {b.index: i for i, b in enumerate(self.streamed)}

    def set_prefetch(self, prefetch: int) -> None:
        """Keep ``prefetch + 1`` GPU slots from now on (between steps; results do not change)."""
        if prefetch < 0:
            raise ValueError(f"offload.prefetch must be >= 0, got {prefetch}")
        if self._bound:
            raise RuntimeError("offload: the prefetch depth can only change between steps")
        self.synchronize()
        self.drop_prefetched()
        self.prefetch = prefetch
        width = max(b.flat.numel() for b in self.blocks)
        dtype = self.blocks[0].flat.dtype
        self.slots = [_Slot(torch.empty(width, dtype=dtype, device=self.device), []) for _ in range(prefetch + 1)]
        self._free: deque[_Slot] = deque(self.slots)

    @property
    def resident_blocks(self) -> int:
        return len(self.blocks) - len(self.streamed)

    def close(self) -> None:
        """Remove the hooks and unpin the host buffers (the model is unusable afterwards)."""
        self.synchronize()
        for h in self._hooks:
            h.remove()
        self._unpin()


# ---------------------------------------------------------------- helpers


def _offloadable_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stacks = layer_stacks(model)
    if not stacks:
        raise UnsupportedModel("offloading needs a model with a stack of identical blocks (nn.ModuleList)")
    name, stack = max(stacks, key=lambda item: len(item[1]))
    return [(f"{name}.{i}", block) for i, block in enumerate(stack)]


def _unique_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen, out = set(), []
    for name, p in module.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _quantized(p: nn.Parameter) -> bool:
    """Integer codes, or 4-bit codes stored in a float dtype (bitsandbytes' quant_storage): a quantized
    base, whose blocks are streamed as frozen byte blocks."""
    return not p.dtype.is_floating_point or getattr(p, "quant_state", None) is not None


def _frozen_tensors(module: nn.Module) -> list[tuple[torch.Tensor, list[tuple[object, str]]]]:
    """Every frozen tensor a block's forward reads, with the (owner, attribute) pairs holding it:
    one entry per tensor however many attributes share it (an int8 weight's codes are also its
    layer's ``state.CB``)."""
    found: dict[tuple, tuple[torch.Tensor, list[tuple[object, str]]]] = {}
    seen: set[tuple[int, str]] = set()
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is None or p.requires_grad:
                continue
            for owner, attr in [(p, "data"), *_scale_holders(sub, p)]:
                t = getattr(owner, attr, None)
                if not isinstance(t, torch.Tensor) or (id(owner), attr) in seen:
                    continue
                seen.add((id(owner), attr))
                key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
                found.setdefault(key, (t, []))[1].append((owner, attr))
    return list(found.values())


def _scale_holders(layer: nn.Module, p: nn.Parameter) -> list[tuple[object, str]]:
    """Where bitsandbytes keeps the scales of a quantized weight ``p`` of ``layer``.

    4-bit: the weight's quantization state (block-wise absmax, code book, and when double quantized
    the absmax's own state). LLM.int8(): row scales that the layer's first forward moves from the
    weight into the layer's state (``init_8bit_state``); that move is made here, as the forward would
    make it, so that the forward reads the tensors bound to the slot and not ones it moved itself.
    """
    out: list[tuple[object, str]] = []
    state = getattr(p, "quant_state", None)
    while state is not None:
        out += [(state, "absmax"), (state, "code"), (state, "offset")]
        state = getattr(state, "state2", None)
    if hasattr(p, "SCB") and hasattr(layer, "init_8bit_state"):
        if getattr(p, "CB", None) is not None:
            scales = p.SCB
            layer.init_8bit_state()
            p.SCB = scales  # where the weights' fingerprint (checkpoint.BaseIdentity) reads them
        out += [(p, "SCB"), (layer.state, "CB"), (layer.state, "SCB")]
    return out


def _param_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, attribute) holding it (tied parameters have several)."""
    where: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                where.setdefault(id(p), []).append((module, attr))
    return where


def _rehome(where, param: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """Make ``param`` hold ``data``; a meta parameter is replaced (in every slot) by a new one."""
    if not param.is_meta:
        param.data = data
        return param
    new = nn.Parameter(data, requires_grad=param.requires_grad)
    slots = where.pop(id(param))
    for module, attr in slots:
        module._parameters[attr] = new
    where[id(new)] = slots
    return new


def _place_resident(model, where, blocks: set[int], device: torch.device, init: InitFn | None) -> None:
    """Every parameter outside the blocks, and every buffer, onto ``device`` (parameters on meta
    are materialised with ``init``)."""
    for pname, p in list(model.named_parameters()):  # tied parameters are listed once
        if id(p) in blocks or (not p.is_meta and p.device == device):
            continue
        target = torch.empty(p.shape, dtype=p.dtype, device=device)
        _fill(target, p, pname, init, device)
        _rehome(where, p, target)
    for module in model.modules():
        for attr, b in module._buffers.items():
            if b is not None and b.device != device and not b.is_meta:
                module._buffers[attr] = b.to(device)


def _fill(dest: torch.Tensor, param: torch.Tensor, name: str, init: InitFn | None, device: torch.device) -> None:
    """Copy ``param``'s values into ``dest``; a parameter on the meta device gets ``init`` instead."""
    if not param.is_meta:
        dest.copy_(param.data)
        return
    if init is None:
        raise ValueError(f"parameter '{name}' is on the meta device and no init was given")
    if dest.device == device:
        init(name, dest)
        return
    scratch = torch.empty(dest.shape, dtype=dest.dtype, device=device)  # random init on the GPU, then down
    init(name, scratch)
    dest.copy_(scratch)


def _left_empty(name: str, t: torch.Tensor) -> None:
    """No values: a peer provides them."""


def random_init(std: float = 0.02) -> InitFn:
    """Benchmark weights: N(0, std) matrices, unit norm weights, zero biases and 1-D others."""

    def init(name: str, t: torch.Tensor) -> None:
        if t.ndim >= 2:  # seeded by the name: every rank of a job builds the same model
            t.normal_(0.0, std, generator=torch.Generator(t.device).manual_seed(stable_key(name) >> 1))
        elif "norm" in name.lower() and name.endswith("weight"):
            t.fill_(1.0)
        else:
            t.zero_()

    return init


def build_on_meta(config, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A causal LM of ``config``'s architecture with no storage: for ``OffloadEngine(init=...)``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model

