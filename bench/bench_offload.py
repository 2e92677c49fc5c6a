"""Offloaded ZO steps: time, GPU memory as nvidia-smi sees it, and the PCIe floor, measured together.

    PYTHONPATH=src python bench/bench_offload.py link --out link.json
    PYTHONPATH=src python bench/bench_offload.py step --model opt-13b --batch 1x2048 --out 13b.json
    PYTHONPATH=src python bench/bench_offload.py step --model opt-13b --gpu-memory 6GiB --out 13b-budget.json
    PYTHONPATH=src torchrun --nproc-per-node 2 bench/bench_offload.py step --model opt-30b --batch 4x512 --pert 2
    PYTHONPATH=src torchrun --nproc-per-node 2 bench/bench_offload.py step --model opt-13b --batch 4x512 --pert 2 \
        --prefetch 1 2 --write-every 1 2 4                # one build, each combination timed in turn

``link`` measures the host link: pinned and pageable host-to-device, device-to-host, both
directions at once, and how fast this host's cores can regenerate z and apply an update
themselves (the alternative to copying updated blocks back).

``step`` builds a random-init bf16 model of a real architecture with its blocks in pinned
host memory (never on the GPU all at once), runs ZO steps through ``OffloadEngine`` and
reports the median step time, the GPU memory in use (total - free from the driver, the
CUDA context included: what nvidia-smi shows), the bytes each rank moved up per step and
the floor = those bytes / this rank's pinned host-to-device bandwidth measured in the same
process (under torchrun, by all ranks at once). ``--pageable`` keeps the host blocks in
pageable memory: ZO2's setting, as a baseline in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

DEFAULT_LAYERS = {"opt-13b": 40, "opt-30b": 48, "opt-66b": 64, "opt-175b": 96}


def model_config(name: str, layers: int | None = None):
    import transformers

    shapes = {  # hidden, ffn, heads
        "opt-6.7b": (4096, 16384, 32), "opt-13b": (5120, 20480, 40), "opt-30b": (7168, 28672, 56),
        "opt-66b": (9216, 36864, 72), "opt-175b": (12288, 49152, 96),
    }
    if name not in shapes:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(shapes)}")
    hidden, ffn, heads = shapes[name]
    return transformers.OPTConfig(
        vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0,
        activation_function="relu", enable_bias=True, use_cache=False, hidden_size=hidden, ffn_dim=ffn,
        num_attention_heads=heads, word_embed_proj_dim=hidden, num_hidden_layers=layers or DEFAULT_LAYERS.get(name, 32),
    )


# ---------------------------------------------------------------- the link


def _timed_copy(dst, src, repeats: int = 5, streams=None) -> float:
    """GB/s of dst.copy_(src) (or of several such pairs at once on their own streams)."""
    pairs = [(dst, src)] if streams is None else list(zip(dst, src))
    streams = streams or [torch.cuda.current_stream()]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for (d, s), st in zip(pairs, streams):
            with torch.cuda.stream(st):
                d.copy_(s, non_blocking=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return sum(d.numel() * d.element_size() for d, _ in pairs) * repeats / seconds / 1e9


def h2d_bandwidth(nbytes: int = 1 << 30) -> float:
    from distzo.offload import pin, unpin

    host = torch.empty(nbytes, dtype=torch.uint8)
    pin(host)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    _timed_copy(dev, host, 1)
    bw = _timed_copy(dev, host)
    unpin(host)
    return bw


def link(args) -> dict:
    from distzo import directions
    from distzo.offload import pin

    n = 1 << 30
    fresh = torch.empty(n, dtype=torch.uint8)
    t0 = time.perf_counter()
    pin(fresh)
    pin_gbs = n / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    pinned = torch.zeros(n, dtype=torch.uint8)  # pages touched by all cores, then registered
    pin(pinned)
    prefaulted_gbs = n / (time.perf_counter() - t0) / 1e9
    pinned2 = torch.empty(n, dtype=torch.uint8)
    pin(pinned2)
    pageable = torch.empty(n, dtype=torch.uint8).fill_(1)
    dev, dev2 = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    _timed_copy(dev, pinned, 1)
    out = {
        "h2d_pinned_GBs": _timed_copy(dev, pinned),
        "d2h_pinned_GBs": _timed_copy(pinned, dev),
        "h2d_pageable_GBs": _timed_copy(dev, pageable, 3),
        "d2h_pageable_GBs": _timed_copy(pageable, dev, 3),
        "pin_fresh_GBs": pin_gbs,
        "zero_and_pin_GBs": prefaulted_gbs,
    }
    both = _timed_copy([dev, pinned2], [pinned, dev2], streams=[torch.cuda.Stream(), torch.cuda.Stream()])
    out["bidirectional_total_GBs"] = both
    # The host applying the update itself: regenerate z from (seed, key) and add g * lr * z.
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    target = torch.zeros(1 << 24, dtype=torch.float32)
    directions.add_direction_(target, 1, 2, 1e-6)
    t0 = time.perf_counter()
    directions.add_direction_(target, 3, 4, 1e-6)
    rate = target.numel() / (time.perf_counter() - t0)
    out.update(cpu_threads=threads, cpu_update_elements_per_s=rate,
               cpu_update_vs_d2h_bf16=(2 * rate / 1e9) / out["d2h_pinned_GBs"])
    return out


# ---------------------------------------------------------------- steps


def nvml_used_gb(device: int) -> float:
    """GPU memory in use on the device (total - free): the context and every allocation."""
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 1e9


def step(args) -> dict:
    from distzo import parallel
    from distzo.offload import OffloadConfig, OffloadEngine, build_on_meta, random_init
    from distzo.optimizer import ZOOptimizer

    mesh = parallel.init(parallel.ParallelConfig(pert=args.pert, dir=1, data=0, timeout_s=1800), "cuda")
    device = torch.cuda.current_device()
    base_used = nvml_used_gb(device)
    rows, seq = (int(x) for x in args.batch.split("x"))
    cfg = model_config(args.model, args.layers)
    t0 = time.perf_counter()
    model = build_on_meta(cfg)
    engine = OffloadEngine(model, "cuda", OffloadConfig("cpu", args.gpu_memory or "", args.prefetch[0]),
                           init=random_init(), slices=parallel.node_slices(mesh), pinned=not args.pageable)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    opt = ZOOptimizer(model, lr=1e-6, eps=1e-3, mesh=mesh, offload=engine)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (rows, seq), generator=g)
    batch = parallel.shard_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
                                 mesh.coord("data"), mesh.size("data"))
    mesh.barrier()
    bw = h2d_bandwidth()  # every rank at once: the per-link rate under full load
    common = {
        "model": args.model, "layers": cfg.num_hidden_layers, "params_B": params / 1e9, "batch": args.batch,
        "world_size": mesh.world_size, "mesh": mesh.sizes, "rank": mesh.rank,
        "gpu_memory_budget": args.gpu_memory, "pageable": args.pageable,
        "blocks": len(engine.blocks), "block_GB": engine.block_bytes / 1e9, "build_s": round(build_s, 1),
        "h2d_GBs": bw, "gpu_used_before_GB": base_used, "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "host_mem_GB": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
    }
    # One build, every (prefetch depth, write-back interval) in turn: both may change between steps.
    runs = {f"p{depth}-w{every}": timed(args, opt, engine, mesh, batch, depth, every, rows * seq, bw, device)
            for depth in args.prefetch for every in args.write_every}
    best = min(runs.values(), key=lambda r: r["ms_per_step"])
    return {**common, **best, "by_prefetch": runs}


def timed(args, opt, engine, mesh, batch, depth: int, every: int, tokens: int, bw: float, device: int) -> dict:
    engine.set_prefetch(depth)
    engine.write_every = every
    torch.cuda.reset_peak_memory_stats()
    times, ups, downs = [], [], []
    for i in range(args.warmup + args.steps):
        mesh.barrier()
        torch.cuda.synchronize()
        before, down, t = engine.bytes_up, engine.bytes_down, time.perf_counter()
        stats = opt.step(batch)  # reading the losses waits for the step
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            ups.append(engine.bytes_up - before)
            downs.append(engine.bytes_down - down)
    opt.flush()
    ms = statistics.median(times) * 1e3
    floor_ms = statistics.median(ups) / (bw * 1e9) * 1e3
    return {
        "prefetch": depth, "write_every": every, "resident_blocks": engine.resident_blocks,
        "bytes_down_per_step_GB": statistics.mean(downs) / 1e9,
        "ms_per_step": ms, "mean_ms": statistics.mean(times) * 1e3, "steps_per_s": 1e3 / ms, "tokens_per_s": tokens / (ms / 1e3),
        "all_ms": [round(t * 1e3, 1) for t in times],
        "bytes_up_per_step_GB": statistics.median(ups) / 1e9, "floor_ms": floor_ms,
        "vs_floor": ms / floor_ms if floor_ms else None,
        "gpu_used_GB": nvml_used_gb(device), "max_reserved_GB": torch.cuda.max_memory_reserved() / 1e9,
        "loss": stats.loss,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["link", "step"])
    p.add_argument("--model", default="opt-13b")
    p.add_argument("--layers", type=int, default=None, help="fewer (or more) blocks than the real model")
    p.add_argument("--batch", default="1x2048", help="rows x tokens (global, under torchrun)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prefetch", type=int, nargs="+", default=[1], help="one or more depths, timed in turn")
    p.add_argument("--write-every", type=int, nargs="+", default=[1], help="one or more write-back intervals")
    p.add_argument("--gpu-memory", default=None)
    p.add_argument("--pert", type=int, default=1)
    p.add_argument("--pageable", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = link(args) if args.what == "link" else step(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    sys.exit(main())
