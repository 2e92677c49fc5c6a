"""Time a ZO step of distzo against MeZO's own way of doing it, on one GPU, in one process.

    PYTHONPATH=src python bench/bench_step.py --out step.json
    PYTHONPATH=src python bench/bench_step.py --runs opt-6.7b:16x64 opt-13b:1x2048 --steps 10
    PYTHONPATH=src python bench/bench_step.py --runs smollm2-135m:16x64:fp32 opt-6.7b:16x64:lora
    PYTHONPATH=src python bench/bench_step.py --runs opt-6.7b:16x64:graphs opt-6.7b:16x64:graphs:packed

A run is model:ROWSxSEQ with optional flags: ``fp32`` builds the model in float32 (bf16
otherwise), ``lora`` wraps it in PEFT LoRA adapters (r 8 on q and v; only they are trained),
``graphs`` steps with ``cuda_graphs=True``, ``rademacher`` or ``packed`` with Rademacher or packed
Rademacher directions instead of Gaussian ones, ``batched`` with ``batch_streams=True`` (each block
once over both streams' rows, only its perturbed layers per stream), ``alone`` with one kernel launch
per tensor (the small tensors of a unit call are otherwise grouped into one launch) (runs differing
only by these share one model; the floor is the same for every kind, so their ratios compare within
one run).

Models are built from their configurations with random weights (bf16, on the GPU; no
download). For each run (model, rows x sequence length) it measures, on the same batch:

  fwd B / fwd 2B   plain inference forwards (+ loss) of B rows and of the batch stacked twice
  mezo             MeZO's step as its trainer does it: torch.manual_seed(seed), then per
                   parameter z = torch.normal(...); p.data = p.data + scale * z * eps, in four
                   passes (+eps, -2 eps, +eps, then the update regenerating z), with two plain
                   forwards of B rows computing the loss
  distzo           ZOOptimizer.step (lr 1e-6, eps 1e-3): one forward of 2B rows with the fused
                   update + shadow pass folded in
  pass             the fused pass alone over every parameter (update + both shadows), with the
                   run's kind of directions

and reports the median ms/step over --steps steps after --warmup, tokens/s, MeZO / distzo,
the host time of a distzo step (its wall time less the time the host waits for the GPU at
the step's one loss read),
the floor (2 x fwd B + 12 bytes/param / measured copy bandwidth) and distzo / floor, and
peak memory (torch.cuda.max_memory_allocated) of each phase.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import time

import torch

# run flags: those that build another model, and those that only change how the same model steps
MODEL_FLAGS = {"fp32", "lora"}
STEP_FLAGS = {"graphs": {"cuda_graphs": True}, "rademacher": {"perturbation": "rademacher"},
              "packed": {"perturbation": "rademacher-packed"}, "batched": {"batch_streams": True}, "alone": {}}
DEFAULT_RUNS = ["opt-6.7b:16x64", "opt-6.7b:16x256", "opt-13b:1x2048", "opt-1.3b:16x64", "llama-3-8b:16x256"]


def model_config(name: str):
    import transformers

    opt = dict(vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True, dropout=0.0,
               attention_dropout=0.0, activation_function="relu", enable_bias=True, use_cache=False)
    if name == "opt-1.3b":
        return transformers.OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                                      word_embed_proj_dim=2048, **opt)
    if name == "opt-6.7b":
        return transformers.OPTConfig(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32,
                                      word_embed_proj_dim=4096, **opt)
    if name == "opt-13b":
        return transformers.OPTConfig(hidden_size=5120, num_hidden_layers=40, ffn_dim=20480, num_attention_heads=40,
                                      word_embed_proj_dim=5120, **opt)
    if name == "smollm2-135m":  # the packaged model's shape: small enough that the host sets the pace
        return transformers.LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                        num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                                        rope_theta=100000.0, tie_word_embeddings=True, use_cache=False)
    if name == "llama-3-8b":
        return transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                                        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                                        use_cache=False)
    raise ValueError(f"unknown model {name!r}")


@contextlib.contextmanager
def _skip_init():
    """Build without running the initialisers (the weights are filled by _randomize)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


@torch.no_grad()
def _randomize(model, seed: int = 0) -> None:
    """Non-zero random weights of realistic scale: N(0, 0.02) matrices and biases, norms ~ 1."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for name, p in model.named_parameters():
        p.normal_(0.0, 0.02, generator=gen)
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.add_(1.0)


def build(name: str, dtype: torch.dtype = torch.bfloat16, lora: bool = False):
    import transformers

    cfg = model_config(name)
    t0 = time.perf_counter()
    with _skip_init(), torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    _randomize(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # B starts at 0 in PEFT; nonzero so that the adapters change the forward
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.02)
    model.eval()
    torch.cuda.synchronize()
    return model, time.perf_counter() - t0


@contextlib.contextmanager
def launches_alone(alone: bool):
    """With ``alone``, every tensor gets a kernel launch of its own (no grouped launches)."""
    from distzo.kernels import triton_ops

    below = triton_ops.GROUP_BELOW
    triton_ops.GROUP_BELOW = 0 if alone else below
    try:
        yield
    finally:
        triton_ops.GROUP_BELOW = below


def make_batch(rows: int, seq: int, vocab: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(2, vocab, (rows, seq), device="cuda", generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def timed(fn, steps: int, warmup: int):
    """Median ms of fn() over `steps` runs after `warmup`, and the peak memory of the timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated()


# ------------------------------------------------------------------ MeZO, as its trainer does it


class MeZOStep:
    """MeZO's ZO-SGD step (zo_step + zo_update of its trainer), kept to its structure."""

    def __init__(self, model, lr: float, eps: float, weight_decay: float = 0.0):
        self.model, self.lr, self.eps, self.weight_decay = model, lr, eps, weight_decay
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.rng = torch.Generator().manual_seed(0)

    def perturb(self, seed: int, scaling_factor: float) -> None:
        torch.manual_seed(seed)
        for _, param in self.named:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.eps

    def forward(self, batch) -> torch.Tensor:
        self.model.eval()
        with torch.inference_mode():
            return self.model(**batch).loss.detach()

    def __call__(self, batch) -> float:
        seed = int(torch.randint(1_000_000_000, (1,), generator=self.rng))
        self.perturb(seed, 1)
        loss1 = self.forward(batch)
        self.perturb(seed, -2)
        loss2 = self.forward(batch)
        projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
        self.perturb(seed, 1)
        torch.manual_seed(seed)
        for name, param in self.named:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - self.lr * (projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (projected_grad * z)
        return float(loss1)


# ------------------------------------------------------------------ measurements


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms, _ = timed(lambda: dst.copy_(src), steps=20, warmup=3)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def largest_unit_bytes(opt) -> int:
    best = 0
    for unit in opt.units:
        names = {name for *_, name in unit.slots}
        best = max(best, sum(opt._by_name[n].param.numel() * opt._by_name[n].param.element_size() for n in names))
    return best


class HostClock:
    """Time the host spends waiting at the step's loss read (``distzo.optimizer._scalars``, the
    one sync of a resident step): a step's host time is its wall time less this wait."""

    def __init__(self):
        from distzo import optimizer

        self.module, self.original, self.wait_s = optimizer, optimizer._scalars, 0.0

    def __enter__(self):
        def timed_read(losses):
            t0 = time.perf_counter()
            try:
                return self.original(losses)
            finally:
                self.wait_s += time.perf_counter() - t0

        self.module._scalars = timed_read
        return self

    def __exit__(self, *exc):
        self.module._scalars = self.original


def host_ms(opt, batch, steps: int) -> tuple[float, float]:
    """Median host ms per step (wall time less the wait at the loss read) and median wall ms
    on the host's clock, each step started and ended with the GPU idle."""
    host, wall = [], []
    with HostClock() as clock:
        for _ in range(steps):
            torch.cuda.synchronize()
            clock.wait_s = 0.0
            t0 = time.perf_counter()
            opt.step(batch)
            torch.cuda.synchronize()
            wall.append((time.perf_counter() - t0) * 1e3)
            host.append(wall[-1] - clock.wait_s * 1e3)
    return statistics.median(host), statistics.median(wall)


def run_one(model, name: str, rows: int, seq: int, bw: float, steps: int, warmup: int, profile_to=None,
            optimizer_kwargs=None, cprofile_to=None) -> dict:
    from distzo.kernels import fused_for
    from distzo.optimizer import ZOOptimizer, causal_lm_loss

    vocab = model.config.vocab_size
    batch = make_batch(rows, seq, vocab)
    double = {k: torch.cat((v, v)) for k, v in batch.items()}
    nparams = sum(p.numel() for p in model.parameters() if p.requires_grad)
    r = {"model": name, "rows": rows, "seq": seq, "tokens": rows * seq, "params": nparams}
    gc.collect()
    torch.cuda.empty_cache()
    r["weights_bytes"] = torch.cuda.memory_allocated()

    def forward(b):
        with torch.no_grad():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            return float(causal_lm_loss(out, b))

    r["fwd_B_ms"], r["peak_fwd_B"] = timed(lambda: forward(batch), steps, warmup)
    r["fwd_2B_ms"], r["peak_fwd_2B"] = timed(lambda: forward(double), steps, warmup)

    mezo = MeZOStep(model, lr=1e-6, eps=1e-3)
    r["mezo_ms"], r["peak_mezo"] = timed(lambda: mezo(batch), steps, warmup)
    del mezo
    gc.collect()
    torch.cuda.empty_cache()

    optimizer_kwargs = optimizer_kwargs or {}
    kind = optimizer_kwargs.get("perturbation", "gaussian")
    opt = ZOOptimizer(model, lr=1e-6, eps=1e-3, **optimizer_kwargs)
    assert opt._fused is not None, "the fused kernels did not load"
    r["largest_unit_bytes"] = largest_unit_bytes(opt)
    losses = []
    r["distzo_ms"], r["peak_distzo"] = timed(lambda: losses.append(opt.step(batch).loss), steps, warmup)
    r["distzo_loss_first_last"] = [losses[0], losses[-1]]
    r["host_ms"], r["distzo_wall_ms"] = host_ms(opt, batch, steps)
    if opt._stream.graphs is not None:
        r["graph_replays"], r["graphs"] = opt._stream.graphs.replays, len(opt._stream.graphs.captures)
    if cprofile_to is not None:  # where the host time goes, by Python function
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(lambda: [opt.step(batch) for _ in range(5)])
        with open(cprofile_to, "w") as f:
            f.write(f"{name} {rows}x{seq}: 5 distzo steps\n")
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)

    # the fused pass alone: one update + shadow pass over every parameter
    ops = fused_for(opt.params[0].param)
    pending = opt.pending

    def one_pass():
        for p in opt.params:
            ops.update_and_shadows(p.param, p.key, pending, kind, 12345, (1e-3, -1e-3))

    r["pass_ms"], _ = timed(one_pass, steps=max(3, steps // 2), warmup=1)
    opt.flush()

    if profile_to is not None:
        from torch.profiler import ProfilerActivity, profile, record_function

        for _ in range(warmup):  # after the flush: steps with and without a pending update are replayed again
            opt.step(batch)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                with record_function("distzo.step"):
                    opt.step(batch)
            torch.cuda.synchronize()
        events = prof.key_averages()
        table = events.table(sort_by="cuda_time_total", row_limit=25)
        host = events.table(sort_by="self_cpu_time_total", row_limit=30)
        with open(profile_to, "w") as f:
            f.write(f"{name} {rows}x{seq}: 2 distzo steps, by GPU time\n{table}\n\nby host time\n{host}\n")

        def device_us(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

        r["profiled_kernel_ms_per_step"] = sum(device_us(e) for e in events if e.key in ("_step_kernel", "_step_grouped_kernel")) / 2e3
        r["profiled_gpu_busy_ms_per_step"] = sum(device_us(e) for e in events if e.device_type.name != "CPU") / 2e3
        r.update(gpu_gaps(prof, profile_to))
    del opt
    gc.collect()
    torch.cuda.empty_cache()

    tokens = rows * seq
    r["floor_ms"] = 2 * r["fwd_B_ms"] + 12 * nparams / bw * 1e3
    r["over_two_forwards"] = r["distzo_ms"] / (2 * r["fwd_B_ms"])
    r["distzo_tokens_per_s"] = tokens / (r["distzo_ms"] * 1e-3)
    r["mezo_tokens_per_s"] = tokens / (r["mezo_ms"] * 1e-3)
    r["speedup_vs_mezo"] = r["mezo_ms"] / r["distzo_ms"]
    r["distzo_over_floor"] = r["distzo_ms"] / r["floor_ms"]
    r["pass_GBps"] = 8 * nparams / (r["pass_ms"] * 1e-3) / 1e9
    # goal: the inference peak of the same B rows, plus two units' weights (shadows), plus 5%
    r["memory_allowance"] = 1.05 * (r["peak_fwd_B"] + 2 * r["largest_unit_bytes"])
    r["memory_ok"] = r["peak_distzo"] <= r["memory_allowance"]
    return r


def gpu_gaps(prof, profile_to: str) -> dict:
    """Where the GPU of the profiled steps stood idle: the span of its kernels and copies, the
    union of their intervals, and the largest gaps with the work on either side (appended to
    the profile file)."""
    events = prof.events()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    host = [(e.time_range.start, e.time_range.end, e.name) for e in events
            if e.device_type.name == "CPU" and e.name != "distzo.step"]

    def doing(t: float) -> str:
        """The innermost host op running at time t (what the GPU waited for)."""
        inside = [(stop - start, name) for start, stop, name in host if start <= t <= stop]
        return min(inside)[1][:50] if inside else "-"
    busy, gaps, end, before = 0.0, [], spans[0][0], spans[0][2]
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, before, name, doing((start + end) / 2)))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, before = stop, name
    gaps.sort(reverse=True)
    with open(profile_to, "a") as f:
        f.write(f"\nGPU span {(end - spans[0][0]) / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms over the profiled steps; "
                f"{len(gaps)} gaps, {sum(g[0] for g in gaps) / 1e3:.2f} ms in all; the largest (host op at the gap's middle):\n")
        for gap, a, b, h in gaps[:30]:
            f.write(f"  {gap:8.1f} us  after {a[:45]}  before {b[:45]}  host: {h}\n")
        by_host: dict[str, float] = {}
        for gap, _, _, h in gaps:
            by_host[h] = by_host.get(h, 0.0) + gap
        f.write("idle by host op: " + ", ".join(f"{h} {t / 1e3:.2f} ms" for h, t in
                                                 sorted(by_host.items(), key=lambda kv: -kv[1])[:12]) + "\n")
        small = sum(g[0] for g in gaps if g[0] < 5.0)
        f.write(f"gaps under 5 us: {sum(1 for g in gaps if g[0] < 5.0)}, {small / 1e3:.2f} ms in all\n")
    return {"profiled_gpu_span_ms": (end - spans[0][0]) / 1e3, "profiled_gpu_union_ms": busy / 1e3,
            "profiled_gap_ms": sum(g[0] for g in gaps) / 1e3}


def table(results: list[dict]) -> str:
    gib = 2.0**30
    head = (f"{'model':<16} {'BxS':>8} {'fwd B':>7} {'fwd 2B':>7} {'MeZO':>8} {'distzo':>8} {'pass':>6} "
            f"{'x MeZO':>6} {'floor':>7} {'/floor':>6} {'/2fwd':>6} {'host':>6} {'tok/s':>8} {'peak GiB':>8} {'infB':>6} {'inf2B':>6} {'MeZO':>6} "
            f"{'mem ok':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['model']:<16} {r['rows']:>3}x{r['seq']:<4} {r['fwd_B_ms']:>7.1f} {r['fwd_2B_ms']:>7.1f} "
            f"{r['mezo_ms']:>8.1f} {r['distzo_ms']:>8.1f} {r['pass_ms']:>6.1f} {r['speedup_vs_mezo']:>6.2f} "
            f"{r['floor_ms']:>7.1f} {r['distzo_over_floor']:>6.2f} {r['over_two_forwards']:>6.2f} {r['host_ms']:>6.1f} "
            f"{r['distzo_tokens_per_s']:>8.0f} "
            f"{r['peak_distzo'] / gib:>8.2f} {r['peak_fwd_B'] / gib:>6.2f} {r['peak_fwd_2B'] / gib:>6.2f} "
            f"{r['peak_mezo'] / gib:>6.2f} {r['memory_ok']!s:>6}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                    help="model:ROWSxSEQ[:fp32][:lora][:graphs][:rademacher|:packed][:batched][:alone], e.g. opt-6.7b:16x64 smollm2-135m:16x64:fp32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="steps before timing (>= 2 for graphs to be captured)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of the first run's step here")
    ap.add_argument("--profile-all", action="store_true", help="profile every run (PROFILE-<i>.txt)")
    ap.add_argument("--cprofile", default=None, help="write a cProfile of the first run's host time here")
    args = ap.parse_args(argv)
    plan: dict[tuple[str, tuple[str, ...]], list[tuple[int, int, tuple[str, ...]]]] = {}
    for spec in args.runs:
        name, shape, *flags = spec.split(":")
        unknown = set(flags) - MODEL_FLAGS - set(STEP_FLAGS)
        if unknown:
            ap.error(f"unknown run flag(s) {sorted(unknown)} in {spec!r}: {', '.join(sorted(MODEL_FLAGS | set(STEP_FLAGS)))}")
        if {"rademacher", "packed"} <= set(flags):
            ap.error(f"{spec!r} names two kinds of directions")
        rows, seq = (int(v) for v in shape.lower().split("x"))
        model_flags = tuple(sorted(set(flags) & MODEL_FLAGS))
        plan.setdefault((name, model_flags), []).append((rows, seq, tuple(f for f in STEP_FLAGS if f in flags)))
    if not torch.cuda.is_available():  # after the runs are checked: a typo fails here too
        print("bench_step needs a CUDA device", file=sys.stderr)
        return 2

    bw = copy_bandwidth()
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "copy_GBps": bw / 1e9,
        "command": "PYTHONPATH=src python bench/bench_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    try:
        import transformers
        import triton

        meta["transformers"], meta["triton"] = transformers.__version__, triton.__version__
    except ImportError:
        pass
    print(f"{meta['device']}  copy {bw / 1e9:.0f} GB/s  torch {torch.__version__}", flush=True)
    results = []
    first = True
    for (base, flags), shapes in plan.items():
        name = ":".join((base, *flags))
        model, build_s = build(base, torch.float32 if "fp32" in flags else torch.bfloat16, "lora" in flags)
        print(f"built {name} in {build_s:.1f} s", flush=True)
        for rows, seq, step_flags in shapes:
            profile_to = args.profile.replace(".txt", f"-{len(results)}.txt") if args.profile and args.profile_all \
                else (args.profile if first else None)
            kwargs = {k: v for f in step_flags for k, v in STEP_FLAGS[f].items()}
            with launches_alone("alone" in step_flags):
                r = run_one(model, ":".join((name, *step_flags)), rows, seq, bw, args.steps, args.warmup,
                            profile_to, optimizer_kwargs=kwargs,
                            cprofile_to=args.cprofile if first else None)
            first = False
            r["build_s"] = build_s
            results.append(r)
            print(table([r]).splitlines()[-1], flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "results": results}, f, indent=1)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
