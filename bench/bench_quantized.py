"""QLoRA-ZO at scale: ZO steps over LoRA adapters on an NF4 base resident on one GPU, random init.

    PYTHONPATH=src python3 bench/bench_quantized.py --out q.json                 # OPT-175B shape, 96 layers
    PYTHONPATH=src python3 bench/bench_quantized.py --layers 24 --out q24.json   # a quarter, extrapolated
    PYTHONPATH=src python3 bench/bench_quantized.py --device cpu --tiny          # every path on the CPU
    PYTHONPATH=src python3 bench/bench_quantized.py --offload --out q66.json     # OPT-66B shape, offloaded

The base is OPT-175B-shaped (hidden 12288, 96 layers, ffn 49152, 96 heads, vocab 50272). It is
never held in bf16: the model is built on the meta device (``distzo.offload.build_on_meta``), then
one decoder layer at a time each ``nn.Linear`` gets a bf16 weight drawn N(0, 0.02) on the GPU
(``distzo.offload.random_init``, seeded by the parameter's name), which a ``bitsandbytes``
``Params4bit`` quantizes there (nf4, blocksize 64, uint8 storage, double quantization only with
``--double-quant``: the settings of ``distzo.models.quantization_settings``) into a
``bnb.nn.Linear4bit`` with compute dtype bf16; the bf16 copy is freed before the next layer. Biases, norms, the embeddings and the
(tied) head are bf16 on the GPU. If the GPU fills up while building, the layers built so far
minus four (room for activations) are kept and the run goes on with those; ``--layers N`` builds
N layers (the per-layer figures extrapolate a shorter run to 96).

Then PEFT LoRA r=8 (alpha 16, no dropout) on q_proj and v_proj, and distzo's
``ZOOptimizer(model, lr=1e-6, eps=1e-3)``, which perturbs the parameters that require grad: the
adapters. For each batch (default 1x512 and 4x512, rows x tokens):

  zo_step      median ms of ``opt.step(batch)`` (10 steps after 3 warm-up; CUDA events): one
               forward of the 2B stacked rows plus the fused update/shadow pass over the adapters;
               with ``--batch-streams`` also ``zo_step_batched``, the same adapters stepped with
               ``batch_streams=True`` (each block once over the 2B rows, only the adapters per stream),
               and ``zo_step_batched_bitsandbytes_dequant``, that step with the NF4 layers' forward
               switched back to bitsandbytes' own (its dequantization instead of distzo's,
               ``distzo.linear4bit``; the layers are built with distzo's, as ``load_model`` gives them);
               with ``--fp8`` also ``zo_step_batched_fp8``, that step with the base computed in fp8
               (``model.base_compute fp8``), and in ``fp8`` the loss of one forward both ways
  fwd_2B       a plain forward (+ loss) of the 2B rows, adapters on, and ``fwd_2B_no_lora`` with
               them disabled (the adapters' share of a forward)
  layer_parts  one decoder layer's pieces alone: dequantizing its six NF4 weights
               (``bnb.functional.dequantize_4bit``, and distzo's kernel) and bf16 GEMMs of the 2B rows with them: the
               floor a dequantize-then-matmul layer cannot go below
  profile      one step under torch.profiler: the top 15 CUDA kernels by time, kernel time by
               kind (NF4 dequantisation, GEMM, distzo's fused kernel, attention, elementwise and
               casts, norms, ...), kernel launches per step and per layer, host (CPU) time
               against kernel (CUDA) time, and the device time of each decoder layer and of the
               LoRA-wrapped q/v projections against their bare NF4 base layer (record_function
               ranges put around them by hooks). In a ZO step each LoRA-wrapped projection runs once
               per stream on its half of the rows (distzo's unit wrapper swaps in that stream's
               perturbed adapter), so q_proj's and v_proj's NF4 weights are dequantized twice per
               layer where a plain forward dequantizes them once: ``launches_per_layer_by_kind``
               shows it

with the peak allocated memory (torch.cuda.max_memory_allocated) and the driver's used memory
(total - free). Per layer: ms (step / layers), extrapolated to 96 layers (an upper estimate: the
head's time is scaled too), memory per layer, and how many layers would fit. Goals:
<= 0.7 s per 1x512 step and <= 2 s per 4x512 step (at 96 layers).

``--offload`` measures offloaded blocks instead, on an OPT-66B shape (hidden 9216, 64 layers, ffn
36864, 72 heads): the NF4 model built as above (on the GPU, about 37 GB), LoRA added, then handed to
``distzo.offload.OffloadEngine``, which moves every decoder block into pinned host memory (the
4-bit codes, their absmax and code book, the bf16 norms and biases) and leaves the adapters on the GPU
(its steps also timed with bitsandbytes' forward, as above);
then the same shape in bf16 offloaded as an unquantized run has it (built on the meta device, each
block random-initialised into pinned host memory by the engine, bf16 adapters since float32 ones
would mix dtypes in a block). For each, per batch: the median step time and the bytes uploaded and
written back per step (the engine's counters over the timed steps), and their ratios. The two are built
one after the other (the first released before the second is built). The bf16 copy
takes about 2 GB of host memory a layer (130 GB at 64 layers); ``--layers`` builds fewer.

Every measurement is guarded: an error (an OOM above all) is recorded as a string and the other
measurements still run. Results go to stdout as JSON lines as they come and to ``--out``
(rewritten after each measurement). Expected on one H200: 3-5 minutes at 96 layers (build about
1-2 min, ~100 GB of NF4 weights).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

# Before CUDA starts: the build frees a bf16 weight after each quantization; expandable segments
# keep those holes from fragmenting the memory the NF4 layers fill.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (Recorder, device_of, environment, guarded, memory, opt_config, release, sync,  # noqa: E402
                      timed_ms)

OPT_175B = dict(hidden=12288, layers=96, ffn=49152, heads=96, vocab=50272)
OPT_66B = dict(hidden=9216, layers=64, ffn=36864, heads=72, vocab=50272)
TINY = dict(hidden=64, layers=2, ffn=256, heads=4, vocab=512)
FULL_LAYERS = OPT_175B["layers"]
GOALS_MS = {"1x512": 700.0, "4x512": 2000.0}
# Kernel kinds, by substrings of the kernel's name (first match wins).
KINDS = [
    ("nf4_dequant", ("dequant",)),
    ("distzo_fused", ("_step_kernel", "_step_grouped_kernel", "_draw_kernel")),
    ("attention", ("flash", "fmha", "attention", "efficient_attention", "softmax")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "gemv", "splitk", "sm90_", "sm80_")),
    ("norm", ("layer_norm", "layernorm", "norm_")),
    ("elementwise_copy_cast", ("elementwise", "copy", "cast", "vectorized", "unrolled", "fill", "index")),
    ("reduce_loss", ("reduce", "nll", "cross_entropy", "log_softmax", "logsumexp")),
]


# ---------------------------------------------------------------- building the NF4 model


class Materializer:
    """Gives meta parameters storage on ``device`` filled by ``init``; a tied parameter once."""

    def __init__(self, model: nn.Module, device: torch.device, init):
        self.device, self.init = device, init
        self.where: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    self.where.setdefault(id(p), []).append((module, attr))

    def module(self, module: nn.Module, prefix: str) -> None:
        for name, p in list(module.named_parameters(prefix=prefix)):
            if p.is_meta:
                self.param(name, p)

    def param(self, name: str, p: nn.Parameter) -> None:
        data = torch.empty(p.shape, dtype=p.dtype, device=self.device)
        self.init(name, data)
        new = nn.Parameter(data, requires_grad=False)
        slots = self.where.pop(id(p))
        for owner, attr in slots:
            owner._parameters[attr] = new
        self.where[id(new)] = slots


def quantized_linear(linear: nn.Linear, name: str, device: torch.device, init, quant_type: str,
                     double_quant: bool = False) -> nn.Module:
    """``linear`` (on meta) as a bnb Linear4bit quantized on ``device`` from a random bf16 weight
    (with ``double_quant``, its scales quantized too)."""
    import bitsandbytes as bnb

    with torch.device("meta"):
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=double_quant, quant_type=quant_type,
                              quant_storage=torch.uint8)
    weight = torch.empty(linear.out_features, linear.in_features, dtype=torch.bfloat16, device=device)
    init(f"{name}.weight", weight)
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=64, compress_statistics=double_quant,
                                 quant_type=quant_type, quant_storage=torch.uint8, module=q).to(device)
    del weight  # the bf16 copy: Params4bit now holds the packed codes and its quant_state the scales
    if linear.bias is not None:
        bias = torch.empty(linear.out_features, dtype=torch.bfloat16, device=device)
        init(f"{name}.bias", bias)
        q.bias = nn.Parameter(bias, requires_grad=False)
    # On the CPU backend: keep bitsandbytes from repacking the weight at its first forward.
    q.support_avx512bf16_for_cpu = False
    return q


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, the 4-bit weights' scales included."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    total += sum(b.numel() * b.element_size() for b in module.buffers())
    for m in module.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
    return total


def build(cfg, device: torch.device, quant_type: str, rec: Recorder, double_quant: bool = False):
    """The NF4 model, one layer at a time; on an error mid-way, the layers that fit (minus four)."""
    from distzo.linear4bit import fast_nf4_forward
    from distzo.offload import build_on_meta, random_init
    from distzo.units import layer_stacks

    init = random_init(0.02)
    t0 = time.perf_counter()
    model = build_on_meta(cfg)
    stack_name, stack = max(layer_stacks(model), key=lambda item: len(item[1]))
    inside = {id(p) for p in stack.parameters()}
    mat = Materializer(model, device, init)
    for name, p in list(model.named_parameters()):  # embeddings, final norm, head (tied): bf16 on the device
        if p.is_meta and id(p) not in inside:
            mat.param(name, p)
    for owner in model.modules():
        for attr, b in owner._buffers.items():
            if b is not None and b.is_meta:
                raise RuntimeError(f"buffer {attr} of {type(owner).__name__} is on meta: not built by this script")
    sync(device)
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    resident_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    layer_s, built, error, requested = [], 0, None, len(stack)
    for i, layer in enumerate(stack):
        t = time.perf_counter()
        try:
            prefix = f"{stack_name}.{i}"
            for name, child in list(layer.named_modules()):
                for attr, sub in list(child.named_children()):
                    if isinstance(sub, nn.Linear):
                        full = ".".join(x for x in (prefix, name, attr) if x)
                        setattr(child, attr, quantized_linear(sub, full, device, init, quant_type, double_quant))
            mat.module(layer, prefix)  # the layer norms
            sync(device)
        except Exception as e:  # out of memory above all: keep what fits
            error = f"{type(e).__name__} at layer {i}: {str(e)[:500]}"
            break
        built += 1
        layer_s.append(time.perf_counter() - t)
    if error is not None:
        keep = max(1, built - 4)
        del stack[keep:]
        cfg.num_hidden_layers = model.config.num_hidden_layers = keep
        release()
    sync(device)
    layers = len(stack)
    per_layer = quantized_bytes(stack[0])
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; PEFT picks its 4-bit LoRA layer by it
    fast_nf4_forward(model)  # as distzo's models.load_model gives an NF4 base (FP4 keeps bitsandbytes' forward)
    alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    info = {"layers": layers, "layers_requested": requested, "build_error": error,
            "build_s": round(time.perf_counter() - t0, 2),
            "layer_build_s_median": statistics.median(layer_s) if layer_s else None,
            "layer_bytes": per_layer, "layer_GB": per_layer / 1e9, "resident_non_layer_GB": resident_bytes / 1e9,
            "weights_GB": (resident_bytes + layers * per_layer) / 1e9,
            "allocated_per_layer_GB": (alloc - base_alloc) / max(layers, 1) / 1e9 if device.type == "cuda" else None,
            "linear_types": sorted({type(m).__name__ for m in stack[0].modules() if "Linear" in type(m).__name__}),
            **memory(device)}
    return model, info


def add_lora(model, r: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# ---------------------------------------------------------------- measuring


def batch_of(rows: int, seq: int, vocab: int, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(rows * 7919 + seq)
    ids = torch.randint(3, vocab, (rows, seq), device=device, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def forward_loss(model, batch: dict) -> float:
    from distzo.optimizer import causal_lm_loss

    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return float(causal_lm_loss(out, batch))


def layer_parts(layer: nn.Module, tokens: int, device: torch.device, steps: int, warmup: int) -> dict:
    """One layer's NF4 dequantisations alone, and bf16 GEMMs of ``tokens`` rows with the dequantized weights."""
    import bitsandbytes as bnb

    from distzo.linear4bit import dequantize_nf4

    quantized = [m for m in layer.modules() if isinstance(m, bnb.nn.Linear4bit)]

    def dequantize_all():
        for m in quantized:
            bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)

    deq = timed_ms(dequantize_all, device, steps, warmup)
    ours = timed_ms(lambda: [dequantize_nf4(m.weight.data, m.weight.quant_state, torch.bfloat16) for m in quantized],
                    device, steps, warmup) \
        if device.type == "cuda" and all(m.weight.quant_state.quant_type == "nf4" for m in quantized) else None
    total = 0.0
    shapes = []
    for m in quantized:
        w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).to(torch.bfloat16)
        x = torch.randn(tokens, w.shape[1], dtype=torch.bfloat16, device=device)
        total += timed_ms(lambda: torch.nn.functional.linear(x, w), device, steps, warmup)["median_ms"]
        shapes.append(list(w.shape))
        del w, x
    parts = {"dequant_ms_per_layer": deq["median_ms"], "gemm_ms_per_layer": total, "tokens": tokens,
             "distzo_dequant_ms_per_layer": ours["median_ms"] if ours else None,
             "linears": len(quantized), "weight_shapes": shapes}
    if ours and torch.cuda.get_device_capability(device) >= (8, 9):
        parts.update(fp8_layer_parts(quantized, tokens, device, steps, warmup))
    return parts


def fp8_layer_parts(quantized: list, tokens: int, device: torch.device, steps: int, warmup: int) -> dict:
    """The same layer in fp8 (``model.base_compute fp8``): its weights dequantized to fp8, ``tokens`` rows
    of each input scaled to fp8, and the scaled fp8 GEMMs alone."""
    from distzo.kernels.fp8 import quantize_rows
    from distzo.linear4bit import _fp8_row_scales, dequantize_nf4

    scales = [_fp8_row_scales(m, m.weight.quant_state, device) for m in quantized]

    def weights():
        return [dequantize_nf4(m.weight.data, m.weight.quant_state, torch.float8_e4m3fn, inv)
                for m, (inv, _) in zip(quantized, scales)]

    deq = timed_ms(weights, device, steps, warmup)["median_ms"]
    xs = [torch.randn(tokens, m.weight.quant_state.shape[1], dtype=torch.bfloat16, device=device) for m in quantized]
    rows = timed_ms(lambda: [quantize_rows(x) for x in xs], device, steps, warmup)["median_ms"]
    ws, qs = weights(), [quantize_rows(x) for x in xs]
    gemm = timed_ms(lambda: [torch._scaled_mm(q, w.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
                             for (q, sx), w, (_, sw) in zip(qs, ws, scales)], device, steps, warmup)["median_ms"]
    return {"fp8_dequant_ms_per_layer": deq, "fp8_rows_ms_per_layer": rows, "fp8_gemm_ms_per_layer": gemm}


def _device_us(e) -> float:
    return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)


def _device_total_us(e) -> float:
    return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0) or 0.0)


def _is_kernel(e) -> bool:
    kind = getattr(e, "device_type", None)
    return kind is not None and kind.name != "CPU"


@contextlib.contextmanager
def ranges(model):
    """record_function ranges around every decoder layer, every LoRA-wrapped q/v projection and its
    bare NF4 base layer, put in by forward hooks (removed on exit)."""
    from distzo.units import layer_stacks

    hooks = []

    def wrap(module, label):
        state = {}

        def pre(m, args):
            state.setdefault("open", []).append(torch.profiler.record_function(label).__enter__())

        def post(m, args, out):
            state["open"].pop().__exit__(None, None, None)

        hooks.append(module.register_forward_pre_hook(pre))
        hooks.append(module.register_forward_hook(post))

    _, stack = max(layer_stacks(model), key=lambda item: len(item[1]))
    for layer in stack:
        wrap(layer, "range:decoder_layer")
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            wrap(m, "range:qv_with_lora")
            wrap(m.base_layer, "range:qv_nf4_base")
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def profile_step(model, opt, batch: dict, device: torch.device, layers: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    opt.step(batch)
    sync(device)
    with ranges(model):
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            opt.step(batch)
            sync(device)
            wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    kernels = [e for e in events if _is_kernel(e)]
    by_kind: dict[str, float] = {}
    launches_by_kind: dict[str, int] = {}
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, subs in KINDS if any(s in name for s in subs)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + _device_us(e) / 1e3
        launches_by_kind[kind] = launches_by_kind.get(kind, 0) + int(e.count)
    cuda_ms = sum(_device_us(e) for e in kernels) / 1e3
    launches = sum(int(e.count) for e in kernels)
    top = sorted(kernels, key=_device_us, reverse=True)[:15]
    cpu_ops = [e for e in events if not _is_kernel(e) and not e.key.startswith("range:")]
    spans = {e.key: {"count": int(e.count), "cpu_ms": e.cpu_time_total / 1e3, "device_ms": _device_total_us(e) / 1e3}
             for e in events if e.key.startswith("range:")}
    out = {
        "wall_ms_profiled": wall_ms,
        "cuda_kernel_ms": cuda_ms,
        "cpu_self_ms": sum(e.self_cpu_time_total for e in cpu_ops) / 1e3,
        "kernel_launches": launches,
        "kernel_launches_per_layer": launches / max(layers, 1),
        "kernel_ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "launches_per_layer_by_kind": {k: round(v / max(layers, 1), 2) for k, v in launches_by_kind.items()},
        "top15_kernels": [{"name": e.key[:160], "ms": round(_device_us(e) / 1e3, 3), "count": int(e.count)}
                          for e in top],
        "top10_cpu_ops": [{"name": e.key[:100], "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
                           "count": int(e.count)}
                          for e in sorted(cpu_ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]],
        "ranges": spans,
    }
    lora, base = spans.get("range:qv_with_lora"), spans.get("range:qv_nf4_base")
    if lora and base:
        out["lora_overhead_device_ms"] = lora["device_ms"] - base["device_ms"]
        out["lora_overhead_cpu_ms"] = lora["cpu_ms"] - base["cpu_ms"]
    opt.flush()
    return out


def run_shape(model, opt, rows: int, seq: int, device: torch.device, args, layers: int, rec: Recorder,
              stack_layer: nn.Module, batched=None) -> None:
    from distzo.linear4bit import bitsandbytes_forward

    vocab = model.config.vocab_size
    key = f"{rows}x{seq}"
    batch = batch_of(rows, seq, vocab, device)
    double = {k: torch.cat((v, v)) for k, v in batch.items()}
    head = {"rows": rows, "seq": seq, "tokens": rows * seq, "layers": layers}

    def step(opt=opt):
        losses = []
        r = timed_ms(lambda: losses.append(opt.step(batch).loss), device, args.steps, args.warmup)
        opt.flush()
        r = {**head, **r, "loss_first_last": [losses[0], losses[-1]], "ms_per_layer": r["median_ms"] / layers,
             "est_ms_at_96_layers": r["median_ms"] * FULL_LAYERS / layers}
        goal = GOALS_MS.get(key)
        if goal is not None:
            r["goal_ms"] = goal
            r["meets_goal_at_96"] = r["est_ms_at_96_layers"] <= goal
        return r

    zo = guarded(rec, f"zo_step_{key}", step)
    zo_batched = guarded(rec, f"zo_step_batched_{key}", lambda: step(batched)) if batched is not None else None
    if batched is not None and args.quant_type == "nf4":
        with bitsandbytes_forward(model):  # the same step with bitsandbytes' own dequantization
            theirs = guarded(rec, f"zo_step_batched_bitsandbytes_dequant_{key}", lambda: step(batched))
        if zo_batched and theirs:
            rec.put(f"dequant_{key}", {"batched_step_over_bitsandbytes_dequant":
                                       zo_batched["median_ms"] / theirs["median_ms"]})
    if batched is not None and args.fp8:
        fp8_step(model, double, head, key, rec, lambda: step(batched), zo_batched)
    fwd = guarded(rec, f"fwd_2B_{key}", lambda: {**head, **timed_ms(lambda: forward_loss(model, double), device,
                                                                   args.steps, args.warmup)})

    def no_lora():
        with model.disable_adapter():
            return {**head, **timed_ms(lambda: forward_loss(model, double), device, args.steps, args.warmup)}

    bare = guarded(rec, f"fwd_2B_no_lora_{key}", no_lora)
    parts = guarded(rec, f"layer_parts_{key}",
                    lambda: layer_parts(stack_layer, 2 * rows * seq, device, max(3, args.steps // 2), 1))
    if zo and fwd:
        summary = {"zo_step_over_fwd_2B": zo["median_ms"] / fwd["median_ms"]}
        if zo_batched:
            summary["batched_zo_step_over_fwd_2B"] = zo_batched["median_ms"] / fwd["median_ms"]
        if bare:
            summary["lora_share_of_fwd"] = 1 - bare["median_ms"] / fwd["median_ms"]
            summary["lora_ms_per_layer"] = (fwd["median_ms"] - bare["median_ms"]) / layers
        if parts:
            floor = parts["dequant_ms_per_layer"] + parts["gemm_ms_per_layer"]
            summary.update(floor_ms_per_layer=floor, dequant_ms_per_layer=parts["dequant_ms_per_layer"],
                           gemm_ms_per_layer=parts["gemm_ms_per_layer"],
                           rest_ms_per_layer=zo["ms_per_layer"] - floor, step_over_floor=zo["ms_per_layer"] / floor)
        rec.put(f"per_layer_{key}", summary)
    if not args.no_profile:
        guarded(rec, f"profile_{key}", lambda: {**head, **profile_step(model, opt, batch, device, layers)})
    del batch, double
    release()


def fp8_step(model, double: dict, head: dict, key: str, rec: Recorder, step, bf16_step) -> None:
    """The batched step with the NF4 base computed in fp8 (``model.base_compute fp8``), and how far the
    loss of one forward of the 2B rows moves from bf16 compute's; the model's forward is bf16 after."""
    from distzo.linear4bit import fast_nf4_forward

    bf16_loss = forward_loss(model, double)
    fast_nf4_forward(model, fp8=True)
    try:
        fp8_loss = forward_loss(model, double)
        ours = guarded(rec, f"zo_step_batched_fp8_{key}", step)
    finally:
        fast_nf4_forward(model)
    summary = {"loss_bf16": bf16_loss, "loss_fp8": fp8_loss, "loss_fp8_minus_bf16": fp8_loss - bf16_loss}
    if ours and bf16_step:
        summary["fp8_step_over_bf16_step"] = ours["median_ms"] / bf16_step["median_ms"]
    rec.put(f"fp8_{key}", {**head, **summary})


# ---------------------------------------------------------------- offloaded: NF4 blocks against bf16 blocks


def offloaded_nf4(cfg, device: torch.device, args, rec: Recorder):
    """The NF4 model built on the GPU as above, with LoRA, its decoder blocks then moved to pinned host memory."""
    from distzo.offload import OffloadConfig, OffloadEngine

    model, info = build(cfg, device, args.quant_type, rec, args.double_quant)
    rec.put("build_nf4", info)
    model = add_lora(model, args.lora_r)
    engine = OffloadEngine(model, device, OffloadConfig("cpu"))
    release()  # the GPU copies of the blocks
    return model, engine


def offloaded_bf16(cfg, device: torch.device, args):
    """The same shape in bf16, never whole on the GPU: built on meta, each block random-initialised into
    pinned host memory by the engine, with bf16 adapters (float32 ones would mix dtypes in a block)."""
    from peft import LoraConfig, get_peft_model

    from distzo.offload import OffloadConfig, OffloadEngine, build_on_meta, random_init

    config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(build_on_meta(cfg), config, autocast_adapter_dtype=False)
    return model, OffloadEngine(model, device, OffloadConfig("cpu"), init=random_init(0.02))


def offloaded_steps(model, engine, spec: str, device: torch.device, args) -> dict:
    """Median step time of ``spec`` (ROWSxSEQ) and the bytes the engine moved per timed step."""
    from distzo.optimizer import ZOOptimizer

    rows, seq = (int(v) for v in spec.lower().split("x"))
    batch = batch_of(rows, seq, model.config.vocab_size, device)
    opt = ZOOptimizer(model, lr=1e-6, eps=1e-3, offload=engine)
    for _ in range(args.warmup):  # here, not in timed_ms: the counters cover the timed steps alone
        opt.step(batch)
    up, down = engine.bytes_up, engine.bytes_down
    r = timed_ms(lambda: opt.step(batch), device, args.steps, 0)
    moved = {"GB_up_per_step": (engine.bytes_up - up) / args.steps / 1e9,
             "GB_down_per_step": (engine.bytes_down - down) / args.steps / 1e9}
    opt.flush()  # after the counters: a flush brings the blocks up once more to apply the last update
    return {"rows": rows, "seq": seq, **r, **moved, "block_MB": engine.block_bytes / 1e6,
            "blocks_streamed": len(engine.streamed)}


def offload_main(args, device: torch.device, batches: list[str], rec: Recorder) -> int:
    from distzo.linear4bit import bitsandbytes_forward

    cfg = opt_config(TINY if args.tiny else OPT_66B, args.layers)
    results = {}
    for kind, make in (("nf4", lambda: offloaded_nf4(cfg, device, args, rec)),
                       ("bf16", lambda: offloaded_bf16(cfg, device, args))):
        holder = {}
        guarded(rec, f"offload_build_{kind}", lambda: holder.update(zip(("model", "engine"), make())) or memory(device))
        if not holder:
            continue
        for spec in batches:
            results[(kind, spec)] = guarded(rec, f"offload_step_{kind}_{spec}",
                                            lambda: offloaded_steps(holder["model"], holder["engine"], spec,
                                                                    device, args))
            if kind == "nf4" and args.quant_type == "nf4":
                with bitsandbytes_forward(holder["model"]):  # the same blocks with bitsandbytes' dequantization
                    guarded(rec, f"offload_step_nf4_bitsandbytes_dequant_{spec}",
                            lambda: offloaded_steps(holder["model"], holder["engine"], spec, device, args))
        holder["engine"].close()  # unpins the host blocks before the next model's
        holder.clear()
        release()
    for spec in batches:
        nf4, bf16 = results.get(("nf4", spec)), results.get(("bf16", spec))
        if nf4 and bf16:
            rec.put(f"offload_nf4_over_bf16_{spec}", {"step_time": nf4["median_ms"] / bf16["median_ms"],
                                                      "bytes_up": nf4["GB_up_per_step"] / bf16["GB_up_per_step"]})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, short batches: checks every path")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers to build (default 96)")
    ap.add_argument("--batches", nargs="+", default=None, help="ROWSxSEQ (default 1x512 4x512)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (10)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (3)")
    ap.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--double-quant", action="store_true", help="quantize the 4-bit scales too (model.double_quant)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--batch-streams", action="store_true",
                    help="also time the step with optim.batch_streams (the base's products once over both streams)")
    ap.add_argument("--fp8", action="store_true",
                    help="with --batch-streams: also time the batched step with the base computed in fp8 "
                         "(model.base_compute fp8)")
    ap.add_argument("--offload", action="store_true",
                    help="OPT-66B shape (tiny with --tiny), NF4 blocks offloaded against bf16 blocks offloaded")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = device_of(args.device)
    tiny = args.tiny
    shape = TINY if tiny else OPT_175B
    batches = args.batches or (["1x16", "4x16"] if tiny else ["1x512", "4x512"])
    args.steps = args.steps or (2 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    rec = Recorder(args.out, environment(device, sys.argv[1:] if argv is None else argv, "bench_quantized.py",
                                         ("transformers", "peft", "triton", "bitsandbytes")))
    if args.offload:
        return offload_main(args, device, batches, rec)
    from distzo.optimizer import ZOOptimizer
    from distzo.units import layer_stacks

    cfg = opt_config(shape, args.layers)
    model, info = build(cfg, device, args.quant_type, rec, args.double_quant)
    rec.put("build", {"model": "tiny OPT" if tiny else "OPT-175B shape", "quant_type": args.quant_type,
                      "double_quant": args.double_quant, **info})

    def peft_and_optimizer():
        nonlocal model
        t0 = time.perf_counter()
        model = add_lora(model, args.lora_r)
        opt = ZOOptimizer(model, lr=1e-6, eps=1e-3)
        # the same adapters stepped with the base's products once over both streams (optim.batch_streams)
        batched = ZOOptimizer(model, lr=1e-6, eps=1e-3, batch_streams=True) if args.batch_streams else None
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        values = {"lora_s": round(time.perf_counter() - t0, 2), "trainable_tensors": len(trainable),
                  "trainable_params": sum(p.numel() for _, p in trainable),
                  "trainable_dtypes": sorted({str(p.dtype) for _, p in trainable}),
                  "all_trainable_are_lora": all("lora_" in n for n, _ in trainable),
                  "fused_kernels": getattr(opt, "_fused", None) is not None, **memory(device)}
        return values, opt, batched

    holder = {}
    guarded(rec, "lora",
            lambda: holder.update(zip(("values", "opt", "batched"), peft_and_optimizer())) or holder["values"])
    opt = holder.get("opt")
    if opt is None:
        return 1
    layers = info["layers"]
    _, stack = max(layer_stacks(model), key=lambda item: len(item[1]))
    for spec in batches:
        rows, seq = (int(v) for v in spec.lower().split("x"))
        run_shape(model, opt, rows, seq, device, args, layers, rec, stack[0], holder["batched"])
    if device.type == "cuda":
        fit = layers_that_fit(rec.data["results"], info, device)
        if fit:
            rec.put("fit", fit)
    return 0


def layers_that_fit(results: dict, info: dict, device: torch.device) -> dict | None:
    """The largest layer count the GPU holds with the largest batch's step, from this run's figures."""
    steps = [(k, v) for k, v in results.items() if k.startswith("zo_step_") and "max_allocated_GB" in v]
    if not steps:
        return None
    key, worst = max(steps, key=lambda kv: kv[1]["max_allocated_GB"])
    free, total = torch.cuda.mem_get_info(device)
    outside = (total - free) - torch.cuda.memory_reserved(device)  # the context, library workspaces
    weights = info["weights_GB"] * 1e9
    activations = worst["max_allocated_GB"] * 1e9 - torch.cuda.memory_allocated(device)
    spare = total * 0.97 - outside - activations - info["resident_non_layer_GB"] * 1e9
    return {"batch": key, "step_peak_over_weights_GB": activations / 1e9, "outside_torch_GB": outside / 1e9,
            "weights_GB": weights / 1e9, "layers_that_fit_est": int(spare // info["layer_bytes"])}


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    raise SystemExit(main())
