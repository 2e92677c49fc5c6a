"""What bench_quantized.py and bench_eval.py share: a results file rewritten after every
measurement, one JSON line per measurement on stdout, a guard that turns a failed measurement
(out of memory, above all) into an error string without losing the others, timers that work on
CUDA and on the CPU, and the memory figures.
"""

from __future__ import annotations

import datetime
import gc
import json
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import torch


class Recorder:
    """Results as {"meta": ..., "results": {name: {...}}}; written to ``out`` after each change."""

    def __init__(self, out: str | None, meta: dict[str, Any]):
        self.out = out
        self.data: dict[str, Any] = {"meta": meta, "results": {}}

    def put(self, name: str, values: dict[str, Any]) -> None:
        self.data["results"].setdefault(name, {}).update(values)
        print(json.dumps({name: values}, default=_plain), flush=True)
        self.save()

    def save(self) -> None:
        if self.out:
            with open(self.out, "w") as f:
                json.dump(self.data, f, indent=1, default=_plain)


def _plain(value):
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return str(value)
    return repr(value)


def guarded(rec: Recorder, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """``fn()``'s values recorded under ``name``; an exception is recorded as ``error`` instead
    (with the peak memory reached), memory is given back, and the run goes on."""
    try:
        values = fn()
    except Exception as e:  # an OOM above all, but any failure of one measurement
        values = {"error": f"{type(e).__name__}: {str(e)[:800]}",
                  "where": traceback.format_exc(limit=-3)[-1500:]}
        if torch.cuda.is_available():
            values["peak_allocated_GB_at_error"] = torch.cuda.max_memory_allocated() / 1e9
        rec.put(name, values)
        release()
        return None
    rec.put(name, values)
    return values


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Median, min and all ms of ``fn()`` over ``steps`` runs after ``warmup`` (CUDA events on
    the GPU, the host clock elsewhere), and the peak memory of the timed runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    reset_peak(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "all_ms": [round(t, 2) for t in times],
            **memory(device)}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory(device: torch.device) -> dict[str, float]:
    """GPU memory now: allocated, the peak since the last reset, reserved, and in use as the
    driver sees it (total - free: the CUDA context and every library's workspace included)."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"allocated_GB": torch.cuda.memory_allocated(device) / 1e9,
            "max_allocated_GB": torch.cuda.max_memory_allocated(device) / 1e9,
            "reserved_GB": torch.cuda.memory_reserved(device) / 1e9,
            "used_GB": (total - free) / 1e9, "total_GB": total / 1e9}


def environment(device: torch.device, argv: list[str], script: str,
                modules=("transformers", "peft", "triton")) -> dict[str, Any]:
    meta: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                            "python": sys.version.split()[0], "device": str(device),
                            "command": f"PYTHONPATH=src python3 bench/{script} " + " ".join(argv)}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    for module in modules:
        try:
            meta[module] = __import__(module).__version__
        except Exception as e:  # absent, or failing to import: say so, the run may not need it
            meta[module] = f"unavailable ({type(e).__name__})"
    return meta


def device_of(arg: str) -> torch.device:
    device = torch.device(arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --device cpu --tiny for a check on the CPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def opt_config(shape: dict, layers: int | None, **special_tokens):
    """An OPT configuration of ``shape`` (hidden, ffn, heads, vocab, layers), ``layers`` overriding
    the layer count, dropout off, as MeZO's and the benchmarks' OPT runs have it."""
    import transformers

    return transformers.OPTConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], ffn_dim=shape["ffn"],
        num_attention_heads=shape["heads"], num_hidden_layers=layers or shape["layers"],
        word_embed_proj_dim=shape["hidden"], max_position_embeddings=2048, do_layer_norm_before=True,
        dropout=0.0, attention_dropout=0.0, activation_function="relu", enable_bias=True, use_cache=False,
        **special_tokens,
    )
