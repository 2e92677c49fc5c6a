"""An NF4 base's forward on the GPU: bitsandbytes' own, bit for bit, with distzo's dequantization."""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch

from distzo.linear4bit import (_dequantize_then_linear, _has_fast_forward, bitsandbytes_forward, dequantize_nf4,
                               fast_nf4_forward)
from distzo.models import LoraSettings, ModelConfig, apply_lora, load_model
from distzo.optimizer import ZOOptimizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def _4bit_layers(model, bnb) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@pytest.mark.parametrize("quantize", ["nf4", "fp4"])
def test_only_the_nf4_layers_of_a_quantized_base_take_the_forward(bnb, tiny_model_dir, quantize):
    model, _ = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu", quantize=quantize))
    layers = _4bit_layers(model, bnb)
    assert layers and all(_has_fast_forward(m) == (quantize == "nf4") for m in layers)


def test_on_the_cpu_the_forward_is_bitsandbytes_own(bnb, tiny_model_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu", quantize="nf4", dtype="float32"))
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        with bitsandbytes_forward(model):
            assert not any(_has_fast_forward(m) for m in _4bit_layers(model, bnb))
            theirs = model(input_ids=ids).logits
    assert torch.equal(ours, theirs) and all(_has_fast_forward(m) for m in _4bit_layers(model, bnb))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_model_with_the_forward_still_copies(bnb, tiny_model_dir, how):
    model, _ = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu", quantize="nf4"))
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    layers = _4bit_layers(twin, bnb)
    assert layers and all(_has_fast_forward(m) for m in layers)  # bound to the copy, not the original


def _quantized(bnb, shape, blocksize: int, nested: bool, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    return bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocksize,nested", [(64, False), (128, False), (64, True)])
@pytest.mark.parametrize("shape", [(512, 768), (300, 700), (33, 65)])  # whole programs; a tail; an odd count
@pytest.mark.parametrize("aligned", [True, False])  # False: codes that do not start on a 4-byte word
def test_the_dequantization_is_bitsandbytes_bit_for_bit(bnb, dtype, blocksize, nested, shape, aligned):
    codes, state = _quantized(bnb, shape, blocksize, nested)
    if not aligned:
        shifted = torch.empty(codes.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
        codes = shifted.copy_(codes.view(-1)).view(codes.shape)
        assert codes.data_ptr() % 4
    state.dtype = dtype
    theirs = bnb.functional.dequantize_4bit(codes, state)
    ours = dequantize_nf4(codes, state, dtype)
    assert ours.shape == shape and theirs.dtype == dtype and torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))


def _layer(bnb, k: int, n: int, nested: bool):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=nested)
    torch.nn.init.normal_(layer.bias, std=0.1)
    return layer.to("cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("rows", [1, 16, 1024, 2048])  # bitsandbytes' fused kernel below some rows; ours past them
def test_a_layer_on_the_gpu_computes_bitsandbytes_bits(bnb, nested, rows):
    layer = _layer(bnb, 768, 2304, nested)
    x = torch.randn(2, rows // 2 or 1, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        theirs = layer(x)  # bitsandbytes' forward (and the compute dtype settled, as in a first forward)
        fast_nf4_forward(layer)
        assert _has_fast_forward(layer)
        ours = layer(x)
        taken = _dequantize_then_linear(x, layer.weight, layer.weight.quant_state, layer.bias) is not None
    assert torch.equal(ours, theirs)
    if rows > 1536:  # past bitsandbytes 0.50's fused-kernel range, every shape is dequantized then multiplied
        assert taken


@pytest.mark.gpu
@cuda
def test_a_dequantization_that_differs_from_bitsandbytes_is_not_used(bnb, monkeypatch, caplog):
    import distzo.kernels.dequant as dequant
    from distzo import linear4bit

    exact = dequant.dequantize_4bit

    def off_by_one(codes, absmax, blocksize, table, out, row_scale=None):  # as if bitsandbytes rounded otherwise
        exact(codes, absmax, blocksize, table, out, row_scale)
        bits = out.view(-1).view({2: torch.int16, 4: torch.int32}[out.element_size()])
        bits[-1:].bitwise_xor_(1)  # the last weight one step off
        return out

    monkeypatch.setattr(dequant, "dequantize_4bit", off_by_one)
    linear4bit._agrees_with_bitsandbytes.cache_clear()
    try:
        layer = _layer(bnb, 768, 2304, False)
        x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            theirs = layer(x)
            fast_nf4_forward(layer)
            with caplog.at_level("WARNING", logger="distzo.linear4bit"):
                ours = layer(x)
                taken = _dequantize_then_linear(x, layer.weight, layer.weight.quant_state, layer.bias)
    finally:
        linear4bit._agrees_with_bitsandbytes.cache_clear()
    assert taken is None and torch.equal(ours, theirs)
    assert "differs from this bitsandbytes'" in caplog.text


@pytest.mark.gpu
@cuda
def test_gradients_through_the_layer_keep_bitsandbytes_path(bnb):
    layer = _layer(bnb, 256, 512, False)
    fast_nf4_forward(layer)
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert _dequantize_then_linear(x, layer.weight, layer.weight.quant_state, layer.bias) is None
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _batch(step: int, vocab: int, rows: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, vocab, (rows, seq), generator=g).cuda()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("batch_streams", [False, True])
def test_a_qlora_run_on_the_gpu_is_bitsandbytes_own_bit_for_bit(bnb, wide_model_dir, monkeypatch, batch_streams):
    """20 ZO steps over an NF4 base at 32 x 64 = 2,048 rows a forward, past bitsandbytes' fused-kernel
    range (so distzo's dequantization computes every base layer), against the same steps with
    bitsandbytes' forward: the same losses and adapters, bit for bit."""
    import distzo.linear4bit as linear4bit

    taken = []  # per base-layer call: whether distzo's dequantization computed it

    def counted(*args, dequantize_then_linear=linear4bit._dequantize_then_linear):
        out = dequantize_then_linear(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(linear4bit, "_dequantize_then_linear", counted)
    runs = []
    for ours in (True, False):
        model, _ = load_model(ModelConfig(name=str(wide_model_dir), device="cuda", quantize="nf4", dtype="bfloat16"))
        torch.manual_seed(0)
        model = apply_lora(model, LoraSettings(r=2, alpha=4))
        opt = ZOOptimizer(model, lr=5e-2, eps=1e-2, seed=0, batch_streams=batch_streams)
        with contextlib.nullcontext() if ours else bitsandbytes_forward(model):
            losses = [opt.step(_batch(t, model.config.vocab_size, 32, 64)).loss for t in range(20)]
        opt.flush()
        runs.append((losses, {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}))
        if ours:
            assert taken and all(taken)
            taken.clear()
    (losses, adapters), (their_losses, their_adapters) = runs
    assert taken == [] and losses == their_losses and len(set(losses)) > 1
    assert adapters.keys() == their_adapters.keys() and all(torch.equal(adapters[n], their_adapters[n]) for n in adapters)
