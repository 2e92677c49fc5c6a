"""The step cost of each algorithm against the baseline its goal names, on one GPU, in one run.

    PYTHONPATH=src python bench/bench_algorithms.py --out algorithms.json

Random-init bf16 models (bench_step.build / bench_offload's meta build; no download):

  resident OPT-6.7B at 16 x 64
    fwd (N+1)B   a plain inference forward of the batch stacked N + 1 = 9 times
    fzoo N=8     ZOOptimizer.step with FZOO: one forward of 9 streams + the shadow passes
    mezo         ZO-SGD, q = 1, Rademacher and Gaussian directions
    momentum h=8 heavy-ball from the last 8 steps (8 directions regenerated per update)
    pass         the fused update + shadow pass alone over every parameter, per record size:
                 the kernel cost per parameter (ns) of 1 and of 8 update directions
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import build, make_batch, timed  # noqa: E402

from distzo.algorithms.fzoo import FZOO  # noqa: E402
from distzo.algorithms.mezo import MeZO  # noqa: E402
from distzo.algorithms.momentum import Momentum  # noqa: E402
from distzo.optimizer import ZOOptimizer  # noqa: E402
from distzo.records import UpdateRecord  # noqa: E402


def _step_ms(model, algorithm, kind, batch, steps, warmup) -> float:
    opt = ZOOptimizer(model, perturbation=kind, algorithm=algorithm)
    ms, peak = timed(lambda: opt.step(batch), steps, warmup)
    opt.flush()
    return ms, peak / 1e9


def _pass_ns_per_param(model, seeds: int, kind: str, steps: int) -> float:
    """The fused update-and-two-shadows pass over every parameter, for a record of ``seeds`` directions."""
    from distzo import kernels
    from distzo.units import trainable_params

    params = trainable_params(model)
    ops = kernels.fused_for(params[0].param)
    record = UpdateRecord(0, tuple(range(1, seeds + 1)), (0.0,) * seeds, 0.0, divisor=1)

    def one():
        for p in params:
            ops.update_and_shadows(p.param, p.key, record, kind, 12345, (1e-3, -1e-3))

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
    out["fzoo_N8_ms"], out["fzoo_N8_peak_GB"] = _step_ms(model, FZOO(lr=1e-6, probes=n), "rademacher", batch,
                                                         args.steps, args.warmup)
    out["fzoo_vs_fwd_9B"] = out["fzoo_N8_ms"] / fwd9
    for kind in ("rademacher", "gaussian"):
        mezo, _ = _step_ms(model, MeZO(lr=1e-6), kind, batch, args.steps, args.warmup)
        heavy, peak = _step_ms(model, Momentum(beta=0.9, history=8, lr=1e-6), kind, batch,
                               args.steps + 8, args.warmup + 8)  # warm-up fills the 8 steps of history
        out[f"mezo_{kind}_ms"], out[f"momentum_h8_{kind}_ms"] = mezo, heavy
        out[f"momentum_vs_mezo_{kind}"] = heavy / mezo
        out[f"pass_ns_per_param_{kind}_1"] = _pass_ns_per_param(model, 1, kind, args.steps)
        out[f"pass_ns_per_param_{kind}_8"] = _pass_ns_per_param(model, 8, kind, args.steps)
    del model
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
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__}
    for part in args.parts:
        result[part] = {"resident": resident, "offloaded": offloaded}[part](args)
        print(json.dumps({part: result[part]}, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
