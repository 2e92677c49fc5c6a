"""The step cost of each algorithm against the baseline its goal names, on one GPU, in one run.

    PYTHONPATH=src python bench/bench_algorithms.py --out algorithms.json

Random-init bf16 models (bench_step.build / bench_offload's meta build; no download):

  resident OPT-6.7B at 16 x 64
    fwd (N+1)B   a plain inference forward of the batch stacked N + 1 = 9 times
    fzoo N=8     ZOOptimizer.step with FZOO: one forward of 9 streams + the shadow passes
                 (Rademacher and packed Rademacher directions; packed with batch_streams too:
                 each block once over the 9 streams' rows, its layers per stream)
    mezo         ZO-SGD, q = 1, Rademacher, Gaussian and packed Rademacher directions
    momentum h=8 heavy-ball from the last 8 steps (8 directions regenerated per update)
    each of the three steps eager and with CUDA graphs (optim.cuda_graphs; ``--graphs``)
    pass         the fused update + shadow pass alone over every parameter, per record size:
                 the kernel cost per parameter (ns) of 1 and of 8 update directions, and of an
                 adam-rule record of 8 steps (momentum's second moment, in registers)
    probe shadows FZOO's 8 one-sided shadows over every parameter, in one pass (what a step
                 runs) and in one pass per seed (how steps ran before)
    buffer pass  for comparison, heavy-ball with a stored bf16 momentum buffer (+2 B/param):
                 one pass that reads theta and m, regenerates the step's z, writes m, theta
                 and both shadows (a bench-only kernel; the library stores no buffer)
  fzoo-profile (``--parts fzoo-profile --profile fzoo.txt [--kind K]``): where the GPU time of the
                 FZOO N=8 step (packed or --kind signs, graphs) goes against the 9B-row forward,
                 by kind of kernel
  fzoo-kinds   FZOO N=8 with graphs, packed and shared signs in alternating pairs, against the
                 9B-row forward; mezo and momentum h=8 with both; the passes per parameter
  offloaded OPT-13B at 1 x 2048
    mezo q=1     2 probes a step (one pair)
    mezo q=2     4 probes a step, measured in one forward: each block still comes up once
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import build, make_batch, timed  # noqa: E402

from distzo.algorithms.fzoo import FZOO  # noqa: E402
from distzo.kernels import triton_ops as tk  # noqa: E402
from distzo.algorithms.mezo import MeZO  # noqa: E402
from distzo.algorithms.momentum import Momentum  # noqa: E402
from distzo.optimizer import ZOOptimizer  # noqa: E402
from distzo.records import UpdateRecord  # noqa: E402


def _step_ms(model, algorithm, kind, batch, steps, warmup, graphs=False, batch_streams=False) -> float:
    opt = ZOOptimizer(model, perturbation=kind, algorithm=algorithm, cuda_graphs=graphs, batch_streams=batch_streams)
    ms, peak = timed(lambda: opt.step(batch), steps, warmup)
    if graphs:  # a measurement that silently ran eagerly would be a wrong row
        assert opt._stream.graphs is not None and opt._stream.graphs.replays > 0, "no graph was replayed"
    opt.flush()
    return ms, peak / 1e9


@triton.jit
def _buffer_kernel(p_ptr, m_ptr, plus_ptr, minus_ptr, n, seeds_ptr, coef_ptr,
                   KIND: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
    # seeds: update seed, rounding seed, shadow seed; coef: g, lr, beta, scale+, scale-
    base = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < n - base
    blk = (base >> 2) + tk._block_index(BLOCK)
    klo = tl.full([], 7, tl.uint32)
    khi = tl.full([], 0, tl.uint32)
    theta = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    slo, shi = tk._seed_halves(seeds_ptr, 0)
    m = tl.load(coef_ptr + 2) * m + tl.load(coef_ptr) * tk._direction(blk, base, klo, khi, slo, shi, BLOCK, KIND, FAST)
    tl.store(m_ptr + base + offs, m.to(tl.bfloat16), mask=mask)
    x = theta.to(tl.float32) - tl.load(coef_ptr + 1) * m
    rlo, rhi = tk._seed_halves(seeds_ptr, 1)
    theta = tk._round_bf16(x, tk._noise(blk, klo, khi, rlo, rhi, BLOCK))
    tl.store(p_ptr + base + offs, theta, mask=mask)
    x = theta.to(tl.float32)
    dlo, dhi = tk._seed_halves(seeds_ptr, 2)
    z = tk._direction(blk, base, klo, khi, dlo, dhi, BLOCK, KIND, FAST)
    tl.store(plus_ptr + base + offs, (x + tl.load(coef_ptr + 3) * z).to(tl.bfloat16), mask=mask)
    tl.store(minus_ptr + base + offs, (x + tl.load(coef_ptr + 4) * z).to(tl.bfloat16), mask=mask)


def _buffer_pass_ns_per_param(model, kind: str, steps: int) -> float:
    """The stored-buffer heavy-ball pass over every bf16 parameter (its buffers allocated here)."""
    from distzo.units import trainable_params

    params = [p.param for p in trainable_params(model)]
    assert all(p.dtype == torch.bfloat16 for p in params)
    buffers = [torch.zeros_like(p) for p in params]
    seeds = torch.tensor([11, 12, 13], dtype=torch.int64, device="cuda")
    coefs = torch.tensor([0.0, 0.0, 0.9, 1e-3, -1e-3], dtype=torch.float32, device="cuda")

    def one():
        for p, m in zip(params, buffers):
            shadows = torch.empty((2, *p.shape), dtype=p.dtype, device=p.device)
            n = p.numel()
            _buffer_kernel[(triton.cdiv(n, tk._BLOCK),)](p, m, shadows[0], shadows[1], n, seeds, coefs,
                                                          KIND=tk._KINDS[kind], FAST=tk.FAST_MATH, BLOCK=tk._BLOCK,
                                                          num_warps=tk._WARPS)

    ms, _ = timed(one, steps, 2)
    del buffers
    return ms * 1e6 / sum(p.numel() for p in params)


def _pass_ns_per_param(model, seeds: int, kind: str, steps: int, adam: bool = False) -> float:
    """The fused update-and-two-shadows pass over every parameter, for a record of ``seeds`` directions
    (``adam``: momentum's adam rule, one direction a step, so ``seeds`` step groups)."""
    from distzo import kernels
    from distzo.units import trainable_params

    params = trainable_params(model)
    ops = kernels.fused_for(params[0].param)
    groups = {"adam": tuple((1, 1.0 / seeds, 1.0 / seeds) for _ in range(seeds)), "delta": 1e-8} if adam else {}
    record = UpdateRecord(0, tuple(range(1, seeds + 1)), (0.0,) * seeds, 0.0, divisor=1, **groups)

    def one():
        for p in params:
            ops.update_and_shadows(p.param, p.key, record, kind, 12345, (1e-3, -1e-3))

    ms, _ = timed(one, steps, 2)
    return ms * 1e6 / sum(p.param.numel() for p in params)


def _probe_shadows_ns_per_param(model, kind: str, steps: int, one_pass: bool, probes: int = 8) -> float:
    """FZOO's shadows over every parameter: N one-sided shadows of N seeds, written by one pass that
    reads theta once (``update_and_shadows_of``, what a step runs) or by one pass per seed."""
    from distzo import kernels
    from distzo.units import trainable_params

    params = trainable_params(model)
    ops = kernels.fused_for(params[0].param)
    seeds, pairs = tuple(range(1, probes + 1)), ((1e-3, 0.0),) * probes

    def one():
        for p in params:
            if one_pass:
                ops.update_and_shadows_of(p.param, p.key, None, kind, seeds, pairs)
            else:
                for seed in seeds:
                    ops.update_and_shadows(p.param, p.key, None, kind, seed, pairs[0])

    ms, _ = timed(one, steps, 2)
    return ms * 1e6 / sum(p.param.numel() for p in params)


def resident(args) -> dict:
    model, _ = build("opt-6.7b")
    rows, seq = 16, 64
    batch = make_batch(rows, seq, model.config.vocab_size)
    n = 8
    stacked = {k: torch.cat([v] * (n + 1)) for k, v in batch.items()}
    with torch.inference_mode():
        fwd9, _ = timed(lambda: model(**stacked), args.steps, args.warmup)
        fwd2, _ = timed(lambda: model(**{k: torch.cat([v] * 2) for k, v in batch.items()}), args.steps, args.warmup)
    out = {"model": "opt-6.7b", "batch": f"{rows}x{seq}", "fwd_9B_ms": fwd9, "fwd_2B_ms": fwd2}
    for graphs in args.graphs:
        tag = "_graphs" if graphs else ""
        out[f"fzoo_N8{tag}_ms"], out[f"fzoo_N8{tag}_peak_GB"] = _step_ms(
            model, FZOO(lr=1e-6, probes=n), "rademacher", batch, args.steps, args.warmup, graphs)
        out[f"fzoo{tag}_vs_fwd_9B"] = out[f"fzoo_N8{tag}_ms"] / fwd9
        packed, _ = _step_ms(model, FZOO(lr=1e-6, probes=n), "rademacher-packed", batch, args.steps, args.warmup, graphs)
        out[f"fzoo_N8_packed{tag}_ms"], out[f"fzoo_packed{tag}_vs_fwd_9B"] = packed, packed / fwd9
        batched, _ = _step_ms(model, FZOO(lr=1e-6, probes=n), "rademacher-packed", batch, args.steps, args.warmup,
                              graphs, batch_streams=True)
        out[f"fzoo_N8_packed_batched{tag}_ms"], out[f"fzoo_packed_batched{tag}_vs_fwd_9B"] = batched, batched / fwd9
        for kind in ("rademacher", "gaussian", "rademacher-packed"):
            mezo, _ = _step_ms(model, MeZO(lr=1e-6), kind, batch, args.steps, args.warmup, graphs)
            heavy, peak = _step_ms(model, Momentum(beta=0.9, history=8, lr=1e-6), kind, batch,
                                   args.steps + 8, args.warmup + 8, graphs)  # warm-up fills the 8 steps of history
            out[f"mezo_{kind}{tag}_ms"], out[f"momentum_h8_{kind}{tag}_ms"] = mezo, heavy
            out[f"momentum{tag}_vs_mezo_{kind}"] = heavy / mezo
    for kind in ("rademacher", "gaussian", "rademacher-packed"):
        out[f"pass_ns_per_param_{kind}_1"] = _pass_ns_per_param(model, 1, kind, args.steps)
        out[f"pass_ns_per_param_{kind}_8"] = _pass_ns_per_param(model, 8, kind, args.steps)
        out[f"pass_ns_per_param_adam_{kind}_8"] = _pass_ns_per_param(model, 8, kind, args.steps, adam=True)
        if kind != "gaussian":  # FZOO's directions: its 8 probes' shadows, in one pass and in 8
            for one_pass, tag in ((True, "one_pass"), (False, "pass_per_seed")):
                out[f"probe_shadows_8_{tag}_ns_per_param_{kind}"] = _probe_shadows_ns_per_param(
                    model, kind, args.steps, one_pass)
        try:  # a comparison only: its failure must not lose the rows above
            out[f"buffer_pass_ns_per_param_{kind}"] = _buffer_pass_ns_per_param(model, kind, args.steps)
        except Exception as exc:  # noqa: BLE001
            out[f"buffer_pass_error_{kind}"] = f"{type(exc).__name__}: {exc}"[:500]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def fzoo_kinds(args) -> dict:
    """FZOO N = 8 on OPT-6.7B at 16 x 64 with CUDA graphs, packed against shared signs (every probe's
    sign of an element from one word), in alternating pairs, against the forward of its 9B rows;
    ZO-SGD and momentum with shared signs beside the packed ones; the passes per parameter."""
    model, _ = build("opt-6.7b")
    batch = make_batch(16, 64, model.config.vocab_size)
    stacked = {k: torch.cat([v] * 9) for k, v in batch.items()}
    with torch.inference_mode():
        fwd9, _ = timed(lambda: model(**stacked), args.steps, args.warmup)
    out = {"model": "opt-6.7b", "batch": "16x64", "fwd_9B_ms": fwd9}
    for pair in range(2):
        for kind in ("rademacher-packed", "rademacher-shared"):
            ms, peak = _step_ms(model, FZOO(lr=1e-6, probes=8), kind, batch, args.steps, args.warmup, True)
            out[f"fzoo_N8_{kind}_graphs_ms_{pair}"], out[f"fzoo_N8_{kind}_peak_GB"] = ms, peak
            out[f"fzoo_{kind}_vs_fwd_9B_{pair}"] = ms / fwd9
    for kind in ("rademacher-packed", "rademacher-shared"):
        mezo, _ = _step_ms(model, MeZO(lr=1e-6), kind, batch, args.steps, args.warmup, True)
        heavy, _ = _step_ms(model, Momentum(beta=0.9, history=8, lr=1e-6), kind, batch, args.steps + 8,
                            args.warmup + 8, True)
        out[f"mezo_{kind}_graphs_ms"], out[f"momentum_h8_{kind}_graphs_ms"] = mezo, heavy
        out[f"pass_ns_per_param_{kind}_1"] = _pass_ns_per_param(model, 1, kind, args.steps)
        out[f"pass_ns_per_param_{kind}_8"] = _pass_ns_per_param(model, 8, kind, args.steps)  # seeds 1..8: one family
        out[f"probe_shadows_8_one_pass_ns_per_param_{kind}"] = _probe_shadows_ns_per_param(model, kind, args.steps,
                                                                                          True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _by_kind(prof, steps: int) -> dict:
    """GPU ms per step of a profile, by kind of kernel (by substrings of its name)."""
    kinds = {"fused": ("_step_",), "gemm": ("gemm", "cutlass", "nvjet", "xmma", "sm90_"),
             "attention": ("flash", "fmha", "sdpa", "attention"), "copy_cat": ("copy", "cat", "elementwise"),
             "softmax_loss": ("softmax", "nll", "reduce")}
    out = dict.fromkeys([*kinds, "other"], 0.0)
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.device_time_total <= 0:
            continue
        name = e.key.lower()
        kind = next((k for k, subs in kinds.items() if any(s in name for s in subs)), "other")
        out[kind] += e.device_time_total / 1e3 / steps
    out["total"] = sum(out.values())
    return out


def fzoo_profile(args) -> dict:
    """Where the GPU time of an FZOO N = 8 step goes (packed signs, CUDA graphs) against the plain
    forward of its 9 x 16 rows: two profiled steps (and forwards), by kind of kernel; the top kernels
    of each go to ``--profile``."""
    from torch.profiler import ProfilerActivity, profile

    model, _ = build("opt-6.7b")
    batch = make_batch(16, 64, model.config.vocab_size)
    stacked = {k: torch.cat([v] * 9) for k, v in batch.items()}
    opt = ZOOptimizer(model, perturbation=args.kind, algorithm=FZOO(lr=1e-6, probes=8), cuda_graphs=True)
    for _ in range(args.warmup):
        opt.step(batch)
    out, tables = {}, []
    with torch.inference_mode():
        model(**stacked)
    for name, fn in (("fwd_9B", lambda: model(**stacked)), (f"fzoo_N8_{args.kind}_graphs", lambda: opt.step(batch))):
        torch.cuda.synchronize()
        with torch.inference_mode() if name == "fwd_9B" else torch.no_grad():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    fn()
                torch.cuda.synchronize()
        out[name] = _by_kind(prof, 2)
        tables.append(f"{name}: two calls, by GPU time\n"
                      + prof.key_averages().table(sort_by="device_time_total", row_limit=15))
    if args.profile:
        Path(args.profile).write_text("\n\n".join(tables))
    opt.flush()
    del opt, model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def offloaded(args) -> dict:
    from bench_offload import model_config

    from distzo.offload import OffloadConfig, OffloadEngine, build_on_meta, random_init

    cfg = model_config("opt-13b", None)
    model = build_on_meta(cfg)
    engine = OffloadEngine(model, "cuda", OffloadConfig("cpu"), init=random_init())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (1, 2048), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = {"model": "opt-13b", "batch": "1x2048", "offload": "cpu"}
    for q in (1, 2):
        opt = ZOOptimizer(model, algorithm=MeZO(lr=1e-6, directions=q), offload=engine)
        times, ups = [], []
        for i in range(args.warmup + args.steps):
            torch.cuda.synchronize()
            before, t = engine.bytes_up, time.perf_counter()
            opt.step(batch)
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
                ups.append(engine.bytes_up - before)
        opt.flush()
        out[f"probes{2 * q}_ms"] = statistics.median(times) * 1e3
        out[f"probes{2 * q}_up_GB"] = statistics.median(ups) / 1e9
    out["probes4_vs_probes2"] = out["probes4_ms"] / out["probes2_ms"]
    engine.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["resident", "offloaded"])
    ap.add_argument("--graphs", nargs="+", choices=["off", "on"], default=["off", "on"],
                    help="resident steps eager (off), with CUDA graphs (on), or both (default: off on)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="with the fzoo-profile part: where its kernel tables go")
    ap.add_argument("--kind", default="rademacher-packed", help="the fzoo-profile part's directions")
    args = ap.parse_args(argv)
    args.graphs = [v == "on" for v in args.graphs]
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__}
    for part in args.parts:
        result[part] = {"resident": resident, "offloaded": offloaded, "fzoo-profile": fzoo_profile,
                        "fzoo-kinds": fzoo_kinds}[part](args)
        print(json.dumps({part: result[part]}, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
