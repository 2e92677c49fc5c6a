"""The forward of an NF4 base's linear layers on a GPU: bitsandbytes' arithmetic, a faster dequantization.

Past a few rows, bitsandbytes computes a 4-bit layer on CUDA by dequantizing the whole weight into a
fresh tensor and calling ``F.linear``; a ZO step's batches (2 x batch x sequence rows) always take that
path. ``fast_nf4_forward`` keeps the path and swaps its dequantization for ``distzo.kernels.dequant``'s,
which writes the same bits in about 0.6x the time (checked against bitsandbytes' once per device, dtype
and scale layout before it is used): the layer's output is bitsandbytes' own, bit for bit, and an
OPT-175B-shaped NF4 step is 0.89-0.91x as long (docs/benchmarks.md). Every other case (the CPU, FP4,
gradients through the layer, the few-row shapes bitsandbytes gives its fused kernel, a bitsandbytes
whose dispatch this module does not know or whose bits differ) runs bitsandbytes' forward unchanged.

``fast_nf4_forward(model, fp8=True)`` (``model.base_compute fp8``) computes the layers in float8 instead,
at every row count: each input row and each weight row scaled into e4m3's range (the weight's rows
dequantized straight to fp8 by the same kernel), one ``torch._scaled_mm`` with float32 accumulation and
a bf16 result, then the bias in the compute dtype. On an H200 its GEMMs run at about 1.75x bf16's rate;
its numbers are not bitsandbytes' (a layer's output a few percent from bf16 compute's, relative, on
random weights; docs/quantized.md), so it is a setting of its own, recorded with the base's quantization.
There is no backward through it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def fast_nf4_forward(model: torch.nn.Module, fp8: bool = False) -> None:
    """Give ``model``'s NF4 layers the forward below (with ``fp8``: ``_fp8_forward``), per layer: only this
    model is affected. A partial, not a bound method, so that the model still deep-copies and pickles.
    With ``fp8``, a ValueError names a layer whose shape the fp8 GEMM does not take."""
    forward = _fp8_forward if fp8 else _forward
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "quant_type", None) == "nf4" and hasattr(module, "compute_dtype"):
            if fp8:
                _check_fp8_shape(name, state)
            module.forward = functools.partial(forward, module)


@contextlib.contextmanager
def bitsandbytes_forward(model: torch.nn.Module) -> Iterator[None]:
    """Within: ``model``'s NF4 layers run bitsandbytes' own forward (its dequantization); after, this
    module's again. For comparing the two."""
    layers = [m for m in model.modules() if _has_fast_forward(m)]
    forwards = [m.__dict__.pop("forward") for m in layers]
    try:
        yield
    finally:
        for module, forward in zip(layers, forwards, strict=True):
            module.forward = forward


def _has_fast_forward(module: torch.nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return (isinstance(forward, functools.partial) and forward.func in (_forward, _fp8_forward)
            and forward.args == (module,))


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # bitsandbytes' Linear4bit.forward, its CPU repacking left out (distzo switches it off on its models)
    if (args or kwargs or x.device.type != "cuda" or not self.compute_type_is_set
            or self.weight.quant_state is None):
        return type(self).forward(self, x, *args, **kwargs)
    state = self.weight.quant_state
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = self.bias
    if bias is not None:
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        bias = bias.to(self.compute_dtype)
    out = _dequantize_then_linear(x, self.weight, state, bias)
    if out is None:
        import bitsandbytes as bnb

        out = bnb.matmul_4bit(x, self.weight, bias=bias, quant_state=state)
    return out.to(inp_dtype)


def _dequantize_then_linear(x, weight, state, bias) -> torch.Tensor | None:
    """bitsandbytes' dequantize-then-``F.linear`` with distzo's dequantization, where bitsandbytes would take
    that path; None where it would not."""
    n, k = state.shape
    rows = x.numel() // max(x.shape[-1], 1)
    if _needs_grad(x, bias) or x.shape[-1] != k or rows == 0 or x.dtype not in _OUTPUT_DTYPES:
        return None
    if not _bitsandbytes_dequantizes(x, rows, n, k, state.blocksize):
        return None
    if not _agrees_with_bitsandbytes(x.device, x.dtype, state.blocksize, bool(state.nested)):
        return None
    return F.linear(x, dequantize_nf4(weight.data, state, x.dtype), bias)


def _needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether autograd records this call: bitsandbytes' own forward then computes it (the fp8 one refuses)."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def dequantize_nf4(codes: torch.Tensor, state, dtype: torch.dtype, row_scale: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """An NF4 weight's ``codes`` (bitsandbytes' packed layout, on a GPU) with ``state``'s scales, as a new
    ``state.shape`` tensor of ``dtype``: bitsandbytes' bits, by distzo's kernel. float8 e4m3 takes a
    ``row_scale`` (float32, one per output row) that multiplies each row's values before the rounding."""
    from distzo.kernels.dequant import dequantize_4bit

    out = torch.empty(tuple(state.shape), dtype=dtype, device=codes.device)
    return dequantize_4bit(codes, _absmax(state), state.blocksize, _nf4_table(codes.device), out, row_scale)


# --------------------------------------------------------------------------- fp8 compute


def _fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The layer in float8 (``model.base_compute fp8``), whatever the row count: ``x``'s rows (in the
    compute dtype) and the weight's rows each scaled to e4m3, ``torch._scaled_mm`` (float32 accumulation,
    a bf16 result), then the bias added in the compute dtype."""
    check_fp8_compute(x.device)  # before Triton is imported: a CPU-only install has none
    from distzo.kernels.fp8 import quantize_rows

    if _needs_grad(x, self.bias):
        raise RuntimeError("model.base_compute fp8 computes the quantized base without a backward; "
                           "a gradient through it needs the base computed in its dtype (model.base_compute none)")
    state = self.weight.quant_state
    n, k = state.shape
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    rows = x.reshape(-1, k).contiguous()
    if rows.shape[0] == 0:
        out = rows.new_zeros((0, n))
    else:
        codes, x_scale = quantize_rows(rows)
        inv, w_scale = _fp8_row_scales(self, state, x.device)
        weight = dequantize_nf4(self.weight.data, state, torch.float8_e4m3fn, inv)
        out = torch._scaled_mm(codes, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
        out = out.to(x.dtype)
    if self.bias is not None:
        out = out + self.bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], n).to(inp_dtype)


def _fp8_row_scales(module: torch.nn.Module, state, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What maps each weight row's largest magnitude to e4m3's largest value (448), and back (as the
    1 x n scale ``torch._scaled_mm`` takes for its second operand). A row's largest magnitude is its
    largest absmax, the NF4 table spanning -1 to 1. Once per device: the base is frozen."""
    from distzo.kernels.fp8 import E4M3_MAX, TINY

    cache = module.__dict__.setdefault("_fp8_row_scales", {})
    if device not in cache:
        n, k = state.shape
        peak = _absmax(state).to(device).view(n, k // state.blocksize).amax(1).clamp(min=TINY)
        top = torch.tensor(E4M3_MAX, device=device)
        cache[device] = (top / peak, (peak / top).view(1, n))
    return cache[device]


def check_fp8_compute(device: torch.device) -> None:
    """A ValueError unless ``device`` has fp8 tensor cores (CUDA compute capability 8.9 or later)."""
    if not _has_fp8(torch.device(device)):
        raise ValueError(f"model.base_compute fp8 needs a CUDA GPU with fp8 tensor cores (compute capability 8.9 "
                         f"or later: Ada, Hopper, Blackwell); {device} has none")


@functools.cache
def _has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _check_fp8_shape(name: str, state) -> None:
    """The fp8 GEMM takes widths that are multiples of 16; the row scales need whole absmax blocks a row."""
    n, k = state.shape
    if n % 16 or k % state.blocksize or k % 16:
        raise ValueError(f"model.base_compute fp8 needs each NF4 layer's output width to be a multiple of 16 and its "
                         f"input width a multiple of 16 and of the blocksize ({state.blocksize}); {name} is "
                         f"{k} -> {n}")


_OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _bitsandbytes_dequantizes(x: torch.Tensor, rows: int, n: int, k: int, blocksize: int) -> bool:
    """Whether bitsandbytes' CUDA dispatch dequantizes and calls ``F.linear`` for this shape, by its own
    rule; False where that rule is not found."""
    rule = _dispatch_rule()
    if rule is None:
        return False
    max_rows, use_custom = rule
    if rows > max_rows or k % blocksize:
        return True
    return not use_custom(x.device.index, x.dtype, rows, n, k)


@functools.cache
def _dispatch_rule():
    """bitsandbytes 0.50's rule (``backends/cuda/ops.py``'s ``gemm_4bit``): the most rows its fused kernel
    takes, and the function that decides below them; None for a bitsandbytes without it. Looked up once:
    it is read on every base layer's call."""
    try:
        from bitsandbytes.backends.cuda import ops
    except ImportError:
        return None
    max_rows = getattr(ops, "_gemm_4bit_custom_max_m", None)
    use_custom = getattr(ops, "_gemm_4bit_use_custom_fn", None)
    return None if max_rows is None or use_custom is None else (max_rows, use_custom)


@functools.cache
def _agrees_with_bitsandbytes(device: torch.device, dtype: torch.dtype, blocksize: int, nested: bool) -> bool:
    """Once per device, dtype and layout: whether distzo's dequantization of a sample weight is
    bitsandbytes' bit for bit. A bitsandbytes that rounds otherwise (another version) would change a
    run's numbers unseen; there its own forward runs instead, and a warning says so."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    g = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn((40, 1030), generator=g, device=device).to(dtype)  # whole programs and a tail
    codes, state = quantize_4bit(sample, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    want = dequantize_4bit(codes, state)
    got = dequantize_nf4(codes, state, dtype)
    if torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
        return True
    logger.warning("distzo's NF4 dequantization differs from this bitsandbytes' on %s (%s, blocksize %d%s): "
                   "its own forward runs instead", device, dtype, blocksize, ", double quantized" if nested else "")
    return False


def _absmax(state) -> torch.Tensor:
    """The float32 scales, double quantization's undone as bitsandbytes' ``dequantize_4bit`` undoes it."""
    if not state.nested:
        return state.absmax
    from bitsandbytes.functional import dequantize_blockwise

    absmax = dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()


@functools.cache
def _nf4_table(device: torch.device) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device=device).to(torch.float32)
