"""Time a ZO step of distzo against MeZO's own way of doing it, on one GPU, in one process.

    PYTHONPATH=src python bench/bench_step.py --out step.json
    PYTHONPATH=src python bench/bench_step.py --runs opt-6.7b:16x64 opt-13b:1x2048 --steps 10

Models are built from their configurations with random weights (bf16, on the GPU; no
download). For each run (model, rows x sequence length) it measures, on the same batch:

  fwd B / fwd 2B   plain inference forwards (+ loss) of B rows and of the batch stacked twice
  mezo             MeZO's step as its trainer does it: torch.manual_seed(seed), then per
                   parameter z = torch.normal(...); p.data = p.data + scale * z * eps, in four
                   passes (+eps, -2 eps, +eps, then the update regenerating z), with two plain
                   forwards of B rows computing the loss
  distzo           ZOOptimizer.step (lr 1e-6, eps 1e-3): one forward of 2B rows with the fused
                   update + shadow pass folded in
  pass             the fused pass alone over every parameter (update + both shadows)

and reports the median ms/step over --steps steps after --warmup, tokens/s, MeZO / distzo,
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


def build(name: str):
    import transformers

    cfg = model_config(name)
    t0 = time.perf_counter()
    with _skip_init(), torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    _randomize(model)
    model.eval()
    torch.cuda.synchronize()
    return model, time.perf_counter() - t0


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


def run_one(model, name: str, rows: int, seq: int, bw: float, steps: int, warmup: int, profile_to=None) -> dict:
    from distzo.kernels import fused_for
    from distzo.optimizer import ZOOptimizer, causal_lm_loss

    vocab = model.config.vocab_size
    batch = make_batch(rows, seq, vocab)
    double = {k: torch.cat((v, v)) for k, v in batch.items()}
    nparams = sum(p.numel() for p in model.parameters())
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

    opt = ZOOptimizer(model, lr=1e-6, eps=1e-3)
    assert opt._fused is not None, "the fused kernels did not load"
    r["largest_unit_bytes"] = largest_unit_bytes(opt)
    losses = []
    r["distzo_ms"], r["peak_distzo"] = timed(lambda: losses.append(opt.step(batch).loss), steps, warmup)
    r["distzo_loss_first_last"] = [losses[0], losses[-1]]

    # the fused pass alone: one update + shadow pass over every parameter
    ops = fused_for(opt.params[0].param)
    pending = opt.pending

    def one_pass():
        for p in opt.params:
            ops.update_and_shadows(p.param, p.key, pending, "gaussian", 12345, (1e-3, -1e-3))

    r["pass_ms"], _ = timed(one_pass, steps=max(3, steps // 2), warmup=1)
    opt.flush()

    if profile_to is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                opt.step(batch)
            torch.cuda.synchronize()
        events = prof.key_averages()
        table = events.table(sort_by="cuda_time_total", row_limit=25)
        with open(profile_to, "w") as f:
            f.write(f"{name} {rows}x{seq}: 2 distzo steps\n{table}\n")

        def device_us(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

        r["profiled_kernel_ms_per_step"] = sum(device_us(e) for e in events if e.key == "_step_kernel") / 2e3
        r["profiled_gpu_busy_ms_per_step"] = sum(device_us(e) for e in events if e.device_type.name != "CPU") / 2e3
    del opt
    gc.collect()
    torch.cuda.empty_cache()

    tokens = rows * seq
    r["floor_ms"] = 2 * r["fwd_B_ms"] + 12 * nparams / bw * 1e3
    r["distzo_tokens_per_s"] = tokens / (r["distzo_ms"] * 1e-3)
    r["mezo_tokens_per_s"] = tokens / (r["mezo_ms"] * 1e-3)
    r["speedup_vs_mezo"] = r["mezo_ms"] / r["distzo_ms"]
    r["distzo_over_floor"] = r["distzo_ms"] / r["floor_ms"]
    r["pass_GBps"] = 8 * nparams / (r["pass_ms"] * 1e-3) / 1e9
    # goal: the inference peak of the same B rows, plus two units' weights (shadows), plus 5%
    r["memory_allowance"] = 1.05 * (r["peak_fwd_B"] + 2 * r["largest_unit_bytes"])
    r["memory_ok"] = r["peak_distzo"] <= r["memory_allowance"]
    return r


def table(results: list[dict]) -> str:
    gib = 2.0**30
    head = (f"{'model':<11} {'BxS':>8} {'fwd B':>7} {'fwd 2B':>7} {'MeZO':>8} {'distzo':>8} {'pass':>6} "
            f"{'x MeZO':>6} {'floor':>7} {'/floor':>6} {'tok/s':>8} {'peak GiB':>8} {'infB':>6} {'inf2B':>6} {'MeZO':>6} "
            f"{'mem ok':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['model']:<11} {r['rows']:>3}x{r['seq']:<4} {r['fwd_B_ms']:>7.1f} {r['fwd_2B_ms']:>7.1f} "
            f"{r['mezo_ms']:>8.1f} {r['distzo_ms']:>8.1f} {r['pass_ms']:>6.1f} {r['speedup_vs_mezo']:>6.2f} "
            f"{r['floor_ms']:>7.1f} {r['distzo_over_floor']:>6.2f} {r['distzo_tokens_per_s']:>8.0f} "
            f"{r['peak_distzo'] / gib:>8.2f} {r['peak_fwd_B'] / gib:>6.2f} {r['peak_fwd_2B'] / gib:>6.2f} "
            f"{r['peak_mezo'] / gib:>6.2f} {r['memory_ok']!s:>6}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="model:ROWSxSEQ, e.g. opt-6.7b:16x64")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of the first run's step here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_step needs a CUDA device", file=sys.stderr)
        return 2

    plan: dict[str, list[tuple[int, int]]] = {}
    for spec in args.runs:
        name, shape = spec.split(":")
        rows, seq = (int(v) for v in shape.lower().split("x"))
        plan.setdefault(name, []).append((rows, seq))

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
    for name, shapes in plan.items():
        model, build_s = build(name)
        print(f"built {name} in {build_s:.1f} s", flush=True)
        for rows, seq in shapes:
            r = run_one(model, name, rows, seq, bw, args.steps, args.warmup, args.profile if first else None)
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
