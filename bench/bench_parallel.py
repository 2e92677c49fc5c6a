"""Time distzo's perturbation and data parallelism on N GPUs against one GPU.

    PYTHONPATH=src python bench/bench_parallel.py --out base.json                    # 1 GPU
    PYTHONPATH=src torchrun --standalone --nproc-per-node 2 bench/bench_parallel.py --out par.json
    PYTHONPATH=src torchrun --standalone --nproc-per-node 4 bench/bench_parallel.py --out par4.json

The model (random-init bf16, built on the GPU as bench/bench_step.py builds it) and the
global batch (--rows x --seq random tokens) are the same in every run. One process times
ZOOptimizer.step on the whole batch. Under torchrun every rank builds the same model and
batch and times, in turn:

    pert      parallel.pert = 2: pert-rank 0 runs theta + eps z, pert-rank 1 theta - eps z (one
              forward of R rows instead of 2R); with N > 2 GPUs, data = N/2 beside it
    data      parallel.data = N: each rank runs both halves on its 1/N of the global batch
    data-xN   parallel.data = N with a global batch N times as large (each rank holds --rows rows)

A step's time is wall time around ``opt.step`` (which returns only when its losses are on the
host), median over --steps after --warmup. tokens/s counts 2 x rows x seq per step (both
halves), as bench_step.py does. Rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# data = 0: every rank not on another axis (all of them, or half beside pert = 2).
MODES = {"pert": dict(pert=2), "data": dict(data=0), "data-xN": dict(data=0)}


def timed_steps(opt, batch, steps: int, warmup: int) -> tuple[float, list[float]]:
    """Median seconds per step and the first step's losses (L+, L-)."""
    times, first = [], None
    for i in range(warmup + steps):
        start = time.perf_counter()
        stats = opt.step(batch)
        elapsed = time.perf_counter() - start
        if first is None:
            first = [stats.losses_plus[0], stats.losses_other[0]]
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times), first


def run(model, batch, rows: int, seq: int, args, mesh=None) -> dict:
    from distzo.optimizer import ZOOptimizer, causal_lm_loss

    opt = ZOOptimizer(model, lr=1e-6, eps=1e-3, loss_fn=causal_lm_loss, mesh=mesh)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with timed_parts(opt) as parts:
        seconds, first = timed_steps(opt, batch, args.steps, args.warmup)
    out = {"rows": rows, "seq": seq, "ms_per_step": round(seconds * 1e3, 2), "steps_per_s": round(1 / seconds, 3),
           "tokens_per_s": round(2 * rows * seq / seconds), "first_losses": first,
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           # medians: the forward (until its losses are on the host) and the exchange of the losses
           "forward_ms": round(statistics.median(parts["forward"][args.warmup:]) * 1e3, 2),
           "exchange_ms": round(statistics.median(parts["exchange"][args.warmup:] or [0.0]) * 1e3, 3)}
    if args.profile:
        try:
            out["gpu_ms_per_step"] = profile_kernels(opt, batch)
        except Exception as exc:  # keep the timings
            out["gpu_ms_per_step"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    opt.flush()
    return out


@contextlib.contextmanager
def timed_parts(opt):
    """Wall time of each step's forward(s) and of its exchange of losses (parallel.assemble)."""
    from distzo import optimizer, parallel

    parts = {"forward": [], "exchange": []}
    forward, assemble = opt.stream_losses, parallel.assemble

    def timed_forward(*a, **k):
        t = time.perf_counter()
        try:
            return forward(*a, **k)
        finally:
            parts["forward"].append(time.perf_counter() - t)

    def timed_assemble(*a, **k):
        t = time.perf_counter()
        try:
            return assemble(*a, **k)
        finally:
            if a[0] is not None and a[0].distributed:
                parts["exchange"].append(time.perf_counter() - t)

    opt.stream_losses, optimizer.parallel.assemble = timed_forward, timed_assemble
    try:
        yield parts
    finally:
        del opt.stream_losses
        optimizer.parallel.assemble = assemble


def profile_kernels(opt, batch, steps: int = 2) -> dict:
    """GPU time per step by kernel kind (torch.profiler): the fused pass, matrix products, the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step(batch)
        torch.cuda.synchronize()
    kinds = {"fused": 0.0, "gemm": 0.0, "nccl": 0.0, "other": 0.0}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        kind = ("fused" if name.startswith("_step_") else "nccl" if "nccl" in name
                else "gemm" if any(k in name for k in ("gemm", "cutlass", "sm90", "nvjet", "xmma")) else "other")
        kinds[kind] += e.device_time_total / 1e3 / steps
    kinds["total"] = sum(kinds.values())
    return {k: round(v, 2) for k, v in kinds.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-6.7b")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--profile", action="store_true", help="also GPU time per step by kernel kind")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from bench_step import build, make_batch, model_config

    from distzo import parallel

    world = parallel.world_size()
    # Rank r's device is set before the model is built, so "cuda" below is its own GPU.
    first_mesh = parallel.init(parallel.ParallelConfig(**MODES[args.modes[0]]), "cuda") if world > 1 else None
    model, build_s = build(args.model)
    vocab = model_config(args.model).vocab_size
    report = {"model": args.model, "world_size": world, "card": torch.cuda.get_device_name(),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__, "build_s": round(build_s, 1),
              "steps": args.steps, "warmup": args.warmup, "runs": {}}
    if world == 1:
        report["runs"]["1gpu"] = run(model, make_batch(args.rows, args.seq, vocab), args.rows, args.seq, args)
        report["runs"]["1gpu-x2"] = run(model, make_batch(2 * args.rows, args.seq, vocab), 2 * args.rows, args.seq,
                                        args)
    for mode in args.modes if world > 1 else []:
        try:
            mesh = first_mesh if mode == args.modes[0] else parallel.init(parallel.ParallelConfig(**MODES[mode]))
            rows = world * args.rows if mode == "data-xN" else args.rows
            batch = make_batch(rows, args.seq, vocab)
            local = parallel.shard_batch(batch, mesh.coord("data"), mesh.size("data"))
            report["runs"][mode] = run(model, local, rows, args.seq, args, mesh)
        except Exception as exc:  # keep the other modes' numbers
            report["runs"][mode] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"rank {os.environ.get('RANK')}: {mode} {json.dumps(report['runs'][mode])}", flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if first_mesh is not None:
        first_mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
