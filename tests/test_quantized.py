"""LoRA adapters trained by ZO over a base quantized by bitsandbytes (nf4, fp4, int8) on CPU.

The engine against the reference step over the adapters of the same quantized model; the quantized
blocks offloaded to host memory against the same run resident; then the real entry point: its
checkpoints (adapter + the base's recipe, no merged model), resume and replay bit for bit, resident
and offloaded, and the one-line refusals.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from one_line import refused
from reference_mezo import mezo_step
from safetensors.torch import load_file

from distzo.checkpoint import BaseIdentity, TrajectoryLog
from distzo.cli import main
from distzo.config import load_config
from distzo.first_order import FirstOrder
from distzo.models import (QUANTIZED_BASE_FILE, LoraSettings, ModelConfig, apply_lora, load_model,
                           load_quantized_checkpoint, move_quantized, resolve_device)
from distzo.offload import ALIGN, OffloadConfig, OffloadEngine
from distzo.optimizer import ZOOptimizer, causal_lm_loss
from distzo.replay import replay

ADAPTER = Path("checkpoints") / "last" / "adapter" / "adapter_model.safetensors"


@pytest.fixture
def bnb():
    """Only the tests that quantize need bitsandbytes (an optional extra, in the test extra)."""
    return pytest.importorskip("bitsandbytes")


def _qlora(model_dir: Path, quantize: str, **model):
    """The tiny Llama quantized at load (``model``: more ModelConfig fields), with adapters seeded as the
    trainer seeds them."""
    model, _ = load_model(ModelConfig(name=str(model_dir), device="cpu", quantize=quantize, **model))
    torch.manual_seed(0)
    model = apply_lora(model, LoraSettings(r=2, alpha=4))
    return model


def _batch(step: int, vocab: int, rows: int = 3, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0  # a right-padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("batch_streams", [False, True])  # True: the base's products once over both streams
@pytest.mark.parametrize("quantize,double_quant", [("nf4", False), ("fp4", False), ("int8", False), ("nf4", True)])
def test_matches_reference_over_the_adapters(bnb, tiny_model_dir, quantize, double_quant, batch_streams):
    engine = _qlora(tiny_model_dir, quantize, double_quant=double_quant)
    ref = _qlora(tiny_model_dir, quantize, double_quant=double_quant)
    frozen = _frozen(engine)
    assert all(p.dtype in (torch.uint8, torch.int8) for n, p in frozen.items() if "q_proj.base_layer" in n)
    state = dict(engine.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert getattr(getattr(state, "quant_state", None), "nested", False) == double_quant  # 8-bit scales
    opt = ZOOptimizer(engine, lr=5e-2, eps=1e-2, seed=0, batch_streams=batch_streams)
    assert bool(opt._stream.batched) == batch_streams
    vocab = engine.config.vocab_size
    for t in range(20):
        batch = _batch(t, vocab)
        stats = opt.step(batch)
        plus, minus, grads = mezo_step(ref, batch, t, lr=5e-2, eps=1e-2, loss_fn=causal_lm_loss)
        # fp32 compute: losses (~4.5) agree to a few ulp (the stacked 2R-row forward reduces in
        # another order); g = dL / 2eps magnifies that 50 times
        assert stats.losses_plus == pytest.approx(plus, abs=1e-5)
        assert stats.losses_other == pytest.approx(minus, abs=1e-5)
        assert stats.projected_grads == pytest.approx(grads, abs=3e-4)
    opt.flush()
    trained = {n: p.detach() for n, p in engine.named_parameters() if p.requires_grad}
    reference = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
    assert trained.keys() == reference.keys() and all("lora_" in n for n in trained)
    # the adapters moved by ~0.2; lr times those g differences, and MeZO's in-place drift, add up to ~1e-5
    assert max(float((trained[n] - reference[n]).abs().max()) for n in trained) < 1e-4
    assert any(float(p.abs().max()) > 1e-2 for n, p in trained.items() if "lora_B" in n)  # they trained
    assert all(torch.equal(p, frozen[n]) for n, p in engine.named_parameters() if not p.requires_grad)


def test_the_fingerprint_sees_the_quantization_scales(bnb, tiny_model_dir, tmp_path):
    # W and 2W quantize to the same 4-bit codes: only the scales tell the two bases apart.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    doubled = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in doubled.model.layers:
            layer.self_attn.k_proj.weight.mul_(2)
    doubled.save_pretrained(tmp_path / "doubled")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "doubled")
    a, b = _qlora(tiny_model_dir, "nf4"), _qlora(tmp_path / "doubled", "nf4")
    codes = "base_model.model.model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(dict(a.named_parameters())[codes], dict(b.named_parameters())[codes])
    assert BaseIdentity.of(a).mismatch(BaseIdentity.of(b)) is not None


# --------------------------------------------------------------------------- offloaded quantized blocks


def _offloaded(model_dir: Path, quantize: str, double_quant: bool = False, **cfg):
    """``_qlora``'s model with its decoder blocks in host memory (on the CPU: the slots are host memory too)."""
    model = _qlora(model_dir, quantize, double_quant=double_quant)
    return model, OffloadEngine(model, "cpu", OffloadConfig("cpu", **cfg))


def _same_params(a, b) -> bool:
    x, y = dict(a.named_parameters()), dict(b.named_parameters())
    return x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)


def _steps_agree(a: ZOOptimizer, b: ZOOptimizer, t: int, vocab: int) -> bool:
    x, y = a.step(_batch(t, vocab)), b.step(_batch(t, vocab))
    return (x.losses_plus, x.losses_other, x.projected_grads) == (y.losses_plus, y.losses_other, y.projected_grads)


@pytest.mark.parametrize("quantize,batch_streams,double_quant", [("nf4", False, False), ("fp4", False, False),
                                                               ("int8", False, False), ("nf4", True, False),
                                                               ("fp4", False, True)])
def test_offloaded_quantized_blocks_equal_resident_bit_for_bit(bnb, tiny_model_dir, quantize, batch_streams,
                                                                double_quant):
    resident = _qlora(tiny_model_dir, quantize, double_quant=double_quant)
    offloaded, engine = _offloaded(tiny_model_dir, quantize, double_quant)
    frozen = _frozen(resident)
    a = ZOOptimizer(resident, lr=5e-2, eps=1e-2, seed=0, batch_streams=batch_streams)
    b = ZOOptimizer(offloaded, lr=5e-2, eps=1e-2, seed=0, offload=engine, batch_streams=batch_streams)
    assert all(_steps_agree(a, b, t, resident.config.vocab_size) for t in range(20))
    a.flush(), b.flush()
    assert _same_params(resident, offloaded)
    assert any(float(p.detach().abs().max()) > 1e-2 for n, p in offloaded.named_parameters() if "lora_B" in n)
    assert all(torch.equal(p, frozen[n]) for n, p in offloaded.named_parameters() if not p.requires_grad)
    # the adapters stay resident, outside the blocks: nothing ever goes down
    assert engine.bytes_down == 0 and all(not b.entries and not b.stale for b in engine.blocks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quantize,double_quant", [("nf4", False), ("fp4", False), ("int8", False), ("nf4", True)])
def test_offloaded_quantized_blocks_equal_resident_on_cuda(bnb, tiny_model_dir, quantize, double_quant):
    # The same CPU-quantized base, resident on the GPU against streamed through it: the forward must
    # read the uploaded codes and scales (on the CPU a slot and the host hold the same values anyway).
    a, b, engine = _resident_and_streamed_on_cuda(tiny_model_dir, quantize, double_quant)
    assert all(_steps_agree(a, b, t, a.model.config.vocab_size) for t in range(20))
    assert _same_adapters(a, b) and engine.bytes_up > 0 and engine.bytes_down == 0


def _resident_and_streamed_on_cuda(model_dir: Path, quantize: str, double_quant: bool = False):
    """Optimisers over one CPU-quantized base, resident on the GPU and streamed through it."""
    offloaded = _qlora(model_dir, quantize, double_quant=double_quant)
    engine = OffloadEngine(offloaded, "cuda", OffloadConfig("cpu"))
    resident = move_quantized(_qlora(model_dir, quantize, double_quant=double_quant), torch.device("cuda"))
    return (ZOOptimizer(resident, lr=5e-2, eps=1e-2, seed=0),
            ZOOptimizer(offloaded, lr=5e-2, eps=1e-2, seed=0, offload=engine), engine)


def _same_adapters(a: ZOOptimizer, b: ZOOptimizer) -> bool:
    """After both optimisers flush: the adapters of their models are equal bit for bit."""
    a.flush(), b.flush()
    adapters = {n: p.detach().cpu() for n, p in a.model.named_parameters() if p.requires_grad}
    return bool(adapters) and all(torch.equal(p.detach().cpu(), adapters[n])
                                  for n, p in b.model.named_parameters() if p.requires_grad)


def _quantized_layers(model, bnb) -> list:
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def _read_by(layer) -> list[torch.Tensor]:
    """What a bitsandbytes layer's forward reads: the codes and their scales."""
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        return [weight.data, weight.quant_state.absmax, weight.quant_state.code]
    return [weight.data, layer.state.CB, layer.state.SCB]


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_quantized_block_computes_from_its_slot(bnb, tiny_model_dir, quantize):
    # On the CPU a slot holds the same values as the host buffer, so only where the tensors live shows
    # that the forward read the uploaded copy: the codes and every scale, from the slot; afterwards the
    # layers point at the host buffers again.
    model, engine = _offloaded(tiny_model_dir, quantize)
    slots, host = _storages(s.buf for s in engine.slots), _storages(b.flat for b in engine.blocks)
    layers = _quantized_layers(model, bnb)
    seen: list[set[int]] = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append(_storages(_read_by(m)))) for m in layers]
    ZOOptimizer(model, lr=5e-2, eps=1e-2, seed=0, offload=engine).step(_batch(0, model.config.vocab_size))
    for h in hooks:
        h.remove()
    assert len(seen) >= len(layers) and all(len(s) == 1 and s <= slots for s in seen)
    assert _storages(t for m in layers for t in _read_by(m)) <= host


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_offloading_keeps_the_base_fingerprint(bnb, tiny_model_dir, quantize):
    # A run fingerprints its base once the engine holds it, replay a fresh load: they must agree (LLM.int8()'s
    # row scales, which the engine moves onto the layer as its first forward would, stay on the weight too).
    model, _ = _offloaded(tiny_model_dir, quantize)
    assert BaseIdentity.of(model) == BaseIdentity.of(_qlora(tiny_model_dir, quantize))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_how_the_cpu_and_the_gpu_quantize_a_base(bnb, wide_model_dir, quantize):
    # The same scales everywhere. NF4: the same codes, which is why a GPU-quantized NF4 base may be rebuilt
    # on the CPU. FP4: the same values, but zero's sign may differ; int8: ties rounded either way, one step
    # apart. Those two are rebuilt where the run quantized them (ModelConfig.quantize_on).
    on_cpu, _ = load_model(ModelConfig(name=str(wide_model_dir), device="cpu", quantize=quantize))
    on_gpu, _ = load_model(ModelConfig(name=str(wide_model_dir), device="cuda", quantize=quantize))
    pairs = list(zip(_quantized_layers(on_cpu, bnb), _quantized_layers(on_gpu, bnb), strict=True))
    assert pairs
    for a, b in pairs:
        (codes, *scales), (gpu_codes, *gpu_scales) = _stored(a), [t.cpu() for t in _stored(b)]
        assert all(torch.equal(x, y) for x, y in zip(scales, gpu_scales, strict=True))
        if quantize == "nf4":
            assert torch.equal(codes, gpu_codes)
        elif quantize == "fp4":  # == takes -0.0 for 0.0
            values = [bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).cpu() for m in (a, b)]
            assert torch.equal(*values)
        else:
            assert int((codes.int() - gpu_codes.int()).abs().max()) <= 1
    if quantize == "nf4":
        assert BaseIdentity.of(on_cpu) == BaseIdentity.of(on_gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quantize", ["fp4", "int8"])
def test_a_base_quantized_on_the_cpu_is_rebuilt_on_the_gpu_bit_for_bit(bnb, wide_model_dir, quantize):
    # what replay and resume do with an offloaded run's base: quantize it on the CPU as the run did, then move it
    on_cpu, _ = load_model(ModelConfig(name=str(wide_model_dir), device="cpu", quantize=quantize))
    moved, _ = load_model(ModelConfig(name=str(wide_model_dir), device="cuda", quantize=quantize, quantize_on="cpu"))
    pairs = list(zip(_quantized_layers(on_cpu, bnb), _quantized_layers(moved, bnb), strict=True))
    assert pairs
    for a, b in pairs:
        assert all(y.is_cuda and torch.equal(x, y.cpu()) for x, y in zip(_stored(a), _stored(b), strict=True))
    assert BaseIdentity.of(on_cpu) == BaseIdentity.of(moved)


def _stored(layer) -> list[torch.Tensor]:
    """What quantizing a bitsandbytes layer stored: its codes and their scales."""
    if getattr(layer.weight, "quant_state", None) is not None:
        return _read_by(layer)
    return [layer.weight.data, layer.weight.SCB]  # int8: the row scales are on the weight until a forward


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _quantized_block_bytes(block) -> int:
    """Bytes of a block's frozen tensors as the engine lays them out: the 4-bit codes, their absmax and
    code book, and the norms, each from a multiple of ALIGN bytes."""
    total = 0
    for p in block.parameters():
        if p.requires_grad:
            continue
        state = getattr(p, "quant_state", None)
        parts = [p.data] + ([] if state is None else [state.absmax, state.code])
        total += sum(_aligned(t.numel() * t.element_size()) for t in parts)
    return total


def test_a_step_uploads_the_quantized_bytes_and_writes_nothing_back(bnb, wide_model_dir):
    quantized = ModelConfig(name=str(wide_model_dir), dtype="bfloat16", device="cpu", quantize="nf4")

    def qlora():
        torch.manual_seed(0)
        return apply_lora(load_model(quantized)[0], LoraSettings(r=2, alpha=4))

    expected = [_quantized_block_bytes(b) for b in qlora().base_model.model.model.layers]  # counted resident
    model = qlora()
    engine = OffloadEngine(model, "cpu", OffloadConfig("cpu"))
    assert [b.nbytes for b in engine.blocks] == expected
    opt = ZOOptimizer(model, lr=5e-2, eps=1e-2, seed=0, offload=engine)
    vocab = model.config.vocab_size
    opt.step(_batch(0, vocab))  # the first step also uploads the second step's first block ahead
    for t in range(1, 4):
        before = engine.bytes_up
        opt.step(_batch(t, vocab))
        assert engine.bytes_up - before == sum(expected)  # each block once, quantized, per step
    opt.flush()
    assert engine.bytes_down == 0
    # the same blocks in bfloat16 (what an unquantized offloaded run streams): 4 bits and a float32 scale
    # per 64 weights (0.5625 bytes) against 2 bytes, a little over a quarter
    plain, _ = load_model(ModelConfig(name=str(wide_model_dir), dtype="bfloat16", device="cpu"))
    bf16 = OffloadEngine(plain, "cpu", OffloadConfig("cpu")).blocks[0].nbytes
    assert 0.27 < expected[0] / bf16 < 0.29


def test_a_promoted_quantized_block_stays_on_the_device(bnb, tiny_model_dir):
    resident = _qlora(tiny_model_dir, "nf4")
    offloaded, engine = _offloaded(tiny_model_dir, "nf4")
    a = ZOOptimizer(resident, lr=5e-2, eps=1e-2, seed=0)
    b = ZOOptimizer(offloaded, lr=5e-2, eps=1e-2, seed=0, offload=engine)
    vocab = resident.config.vocab_size
    assert all(_steps_agree(a, b, t, vocab) for t in range(3))
    engine.promote(1)  # what the gpu_memory budget does after the first step
    kept = [blk for blk in engine.blocks if blk not in engine.streamed]
    assert engine.resident_blocks == len(kept) == 1 and kept[0].flat.numel() == 0
    # its layers compute from its own device copy, never from a slot or a streamed block's buffer
    elsewhere = _storages(s.buf for s in engine.slots) | _storages(blk.flat for blk in engine.streamed)
    seen: list[set[int]] = []
    for m in _quantized_layers(kept[0].module, bnb):
        m.register_forward_hook(lambda m, args, out: seen.append(_storages(_read_by(m))))
    for t in range(3, 6):
        before = engine.bytes_up
        assert _steps_agree(a, b, t, vocab)
        assert engine.bytes_up - before == engine.streamed[0].nbytes  # the promoted block no longer moves
    assert seen and len(set.union(*seen)) == 1 and not set.union(*seen) & elsewhere
    a.flush(), b.flush()
    assert _same_params(resident, offloaded) and engine.bytes_down == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_promoted_quantized_block_equals_resident_on_cuda(bnb, tiny_model_dir, quantize):
    # Promotion moves a block's codes and scales into device memory of its own: from then on the
    # block computes from that copy (every tensor its layers read is on the GPU) and only the other
    # block is uploaded, and the run stays the resident run bit for bit.
    a, b, engine = _resident_and_streamed_on_cuda(tiny_model_dir, quantize)
    vocab = a.model.config.vocab_size
    assert all(_steps_agree(a, b, t, vocab) for t in range(3))
    engine.promote(1)
    kept = [blk for blk in engine.blocks if blk not in engine.streamed]
    assert engine.resident_blocks == len(kept) == 1
    for t in range(3, 8):
        before = engine.bytes_up
        assert _steps_agree(a, b, t, vocab)
        assert engine.bytes_up - before == sum(blk.nbytes for blk in engine.streamed)
    assert all(t.is_cuda for m in _quantized_layers(kept[0].module, bnb) for t in _read_by(m))
    assert _same_adapters(a, b) and engine.bytes_down == 0


def test_backprop_through_offloaded_quantized_blocks_isrefused(bnb, tiny_model_dir):
    # The adapters of a quantized block are resident, but a gradient reaching them would flow back
    # through the block's base, which has left the GPU by then.
    model, engine = _offloaded(tiny_model_dir, "nf4")
    fo = FirstOrder.select(model, ["*layers.1.*lora_A*"])
    with pytest.raises(ValueError, match="lives in an offloaded block"):
        ZOOptimizer(model, first_order=fo, offload=engine)


# --------------------------------------------------------------------------- the real entry point


def _args(model_dir, data_dir, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--model.quantize", "nf4", "--lora", "--lora.r", "2",
            "--task", "sst2", "--data", str(data_dir), "--output-dir", str(out), "--task.num_train", "32",
            "--task.num_dev", "8", "--task.num_test", "8", "--batch-size", "4", "--lr", "1e-1", "--eps", "1e-2",
            "--progress", "false", "--tensorboard", "false", "--zero_shot", "false", *extra]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in TrajectoryLog(out / "trajectory.jsonl").read()]


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def run(tiny_model_dir, sst2_dir, tmp_path_factory) -> Path:
    """A finished 4-step nf4 run through ``distzo train``. Read-only."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "4")) == 0
    return out


def test_train_writes_the_adapter_and_the_base_recipe(bnb, run, tiny_model_dir):
    from peft import PeftModel

    header = TrajectoryLog(run / "trajectory.jsonl").header()
    assert header.extra["quantize"] == {"method": "bitsandbytes", "type": "nf4", "compute_dtype": "float32",
                                        "double_quant": False, "storage": "uint8",
                                        "quantized_on": resolve_device("auto").type}
    assert header.environment["bitsandbytes"] == bnb.__version__
    last = run / "checkpoints" / "last"
    assert not (last / "model.safetensors").exists()  # no lossy merge into 4 bits
    recipe = json.loads((last / QUANTIZED_BASE_FILE).read_text())
    assert recipe["base_model"] == str(tiny_model_dir) and recipe["quantization"] == header.extra["quantize"]
    assert recipe["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    card = (last / "README.md").read_text()
    assert "library_name: peft" in card and f"quantize='nf4', quantize_on='{resolve_device('auto').type}')" in card
    assert len(set(_losses(run))) == 4  # the adapters moved

    # what the model card says to do: the base rebuilt as recorded, the adapter over it
    base, _ = load_model(ModelConfig(recipe["base_model"], dtype=recipe["dtype"], quantize="nf4",
                                     quantize_on=recipe["quantization"]["quantized_on"]))
    loaded = PeftModel.from_pretrained(base, last / "adapter")
    saved = load_file(run / ADAPTER)
    weights = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(weights) == len(saved) and any(float(p.abs().max()) > 0 for n, p in weights.items() if "lora_B" in n)


def test_resume_continues_step_for_step(bnb, run, tiny_model_dir, sst2_dir, tmp_path):
    split = tmp_path / "split"
    assert main(_args(tiny_model_dir, sst2_dir, split, "--steps", "2")) == 0
    assert main(_args(tiny_model_dir, sst2_dir, split, "--steps", "4", "--resume")) == 0
    assert _losses(split) == _losses(run)
    assert _same_tensors(split / ADAPTER, run / ADAPTER)


def test_batched_streams_through_the_entry_point(bnb, run, tiny_model_dir, sst2_dir, tmp_path, capsys):
    # the base's products once over both streams: the same run up to the rounding of those products
    batched = tmp_path / "batched"
    assert main(_args(tiny_model_dir, sst2_dir, batched, "--steps", "2", "--batch-streams", "true")) == 0
    assert load_config(batched / "config.yaml").optim.batch_streams
    assert _losses(batched) == pytest.approx(_losses(run)[:2], abs=1e-5)
    log = (batched / "trajectory.jsonl").read_bytes()
    capsys.readouterr()
    # the last bits of its losses are the setting's: a resume may not change it, and keeps it
    assert main(_args(tiny_model_dir, sst2_dir, batched, "--steps", "4", "--resume", "--batch-streams", "false")) == 2
    assert "batch_streams" in capsys.readouterr().err
    assert (batched / "trajectory.jsonl").read_bytes() == log
    assert main(_args(tiny_model_dir, sst2_dir, batched, "--steps", "4", "--resume")) == 0
    assert load_config(batched / "config.yaml").optim.batch_streams
    assert _losses(batched) == pytest.approx(_losses(run), abs=1e-5)


def test_replay_rebuilds_the_adapter_bit_for_bit(bnb, run, tiny_model_dir, tmp_path):
    rebuilt = replay(str(tiny_model_dir), run / "trajectory.jsonl", tmp_path / "rebuilt").output
    assert _same_tensors(rebuilt / "adapter" / "adapter_model.safetensors", run / ADAPTER)
    assert (rebuilt / QUANTIZED_BASE_FILE).is_file() and not (rebuilt / "model.safetensors").exists()


def test_eval_scores_a_quantized_checkpoint_as_the_run_did(bnb, run, sst2_dir, capsys):
    from peft import PeftModel

    last = run / "checkpoints" / "last"
    model, _ = load_quantized_checkpoint(str(last))
    recipe = json.loads((last / QUANTIZED_BASE_FILE).read_text())
    base, _ = load_model(ModelConfig(recipe["base_model"], dtype=recipe["dtype"], quantize="nf4"))
    bare = _batch(0, base.config.vocab_size)
    bare_logits = base(input_ids=bare["input_ids"]).logits
    by_hand = PeftModel.from_pretrained(base, last / "adapter")  # what the model card says to do
    with torch.no_grad():
        logits = model(input_ids=bare["input_ids"]).logits
        assert torch.equal(logits, by_hand(input_ids=bare["input_ids"]).logits)
    assert not torch.equal(logits, bare_logits)  # the adapter is in effect
    capsys.readouterr()
    assert main(["eval", "--model", str(last), "--task", "sst2", "--data", str(sst2_dir), "--split", "test",
                 "--num-examples", "8"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = json.loads((run / "results.json").read_text())
    assert scored["examples"] == final["test_examples"] and scored["accuracy"] == final["final"]["accuracy"]


def test_a_quantized_checkpoint_is_not_taken_for_a_model(bnb, run, tiny_model_dir, sst2_dir, tmp_path, capsys):
    last = run / "checkpoints" / "last"
    with pytest.raises(ValueError, match="checkpoint of a run on a quantized base"):
        load_model(ModelConfig(str(last)))  # what train --model would load: an adapter is not a base
    broken = tmp_path / "broken"
    shutil.copytree(last, broken)
    (broken / QUANTIZED_BASE_FILE).write_text("{", encoding="utf-8")
    err = refused(capsys, ["eval", "--model", str(broken), "--task", "sst2", "--data", str(sst2_dir)])
    assert "could not read the base recipe" in err
    shutil.rmtree(broken / "adapter")
    shutil.copy(last / QUANTIZED_BASE_FILE, broken / QUANTIZED_BASE_FILE)
    err = refused(capsys, ["eval", "--model", str(broken), "--task", "sst2", "--data", str(sst2_dir)])
    assert "holds no adapter" in err


@pytest.mark.parametrize("axis", ["pert", "data"])
def test_torchrun_over_a_quantized_base_equals_the_single_process_run(bnb, run, tiny_model_dir, sst2_dir, tmp_path,
                                                                       axis):
    # two ranks, each holding the quantized base: one probe each (pert), or half of each batch (data).
    # float32: a rank's forward of R rows (or R/2) rounds unlike the stacked 2R-row one by ~1e-7 in
    # the loss, which g = dL / 2eps (eps 1e-2) carries as ~1e-5
    _two_ranks_match(run, _args(tiny_model_dir, sst2_dir, tmp_path / "ranks", "--steps", "4"), axis)


def _two_ranks_match(reference: Path, argv: list[str], axis: str) -> Path:
    """``distzo train argv`` under torchrun on two ranks of ``axis``: the single-process ``reference``'s
    seeds, its losses and g's within a rank's float32 rounding, its adapter within 1e-5."""
    from test_parallel import _torchrun  # torchrun as the distributed tests start it

    out = Path(argv[argv.index("--output-dir") + 1])
    done = _torchrun("--standalone", "--nproc-per-node", "2", "-m", "distzo.cli", *argv, f"--parallel.{axis}", "2",
                     timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "launch.json").read_text())["mesh"][axis] == 2
    got, want = TrajectoryLog(out / "trajectory.jsonl").read(), TrajectoryLog(reference / "trajectory.jsonl").read()
    assert [r["seeds"] for r in got] == [r["seeds"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grads"] == pytest.approx(b["grads"], abs=1e-3)
    x, y = load_file(out / ADAPTER), load_file(reference / ADAPTER)
    assert x.keys() == y.keys() and max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-5
    return out


@pytest.fixture(scope="module")
def offloaded_run(tiny_model_dir, sst2_dir, tmp_path_factory) -> Path:
    """``run`` again with the quantized blocks in host memory (--offload cpu). Read-only."""
    out = tmp_path_factory.mktemp("qlora-offload") / "run"
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "4", "--offload", "cpu")) == 0
    return out


@pytest.mark.parametrize("axis", ["pert", "data"])
def test_sliced_offload_of_quantized_blocks_equals_the_single_process_run(bnb, offloaded_run, tiny_model_dir,
                                                                           sst2_dir, tmp_path, axis):
    # torchrun, two ranks, --offload cpu: the quantized blocks in one shared host copy that the
    # first rank fills, each rank uploading half of every block's bytes and gathering the rest; as
    # close to the single-process offloaded run as the resident torchrun test above is to its run
    out = _two_ranks_match(offloaded_run, _args(tiny_model_dir, sst2_dir, tmp_path / "ranks", "--steps", "4",
                                                "--offload", "cpu"), axis)
    assert (out / "checkpoints" / "last" / QUANTIZED_BASE_FILE).is_file()
    assert not list(Path("/dev/shm").glob("distzo-*"))  # the shared buffers leave nothing behind


def test_a_sliced_quantized_block_is_filled_by_the_first_rank_and_gathered(bnb, tiny_model_dir, tmp_path):
    """Two ranks (torchrun, gloo), each with the quantized model it loaded: both hold the same host
    bytes of every block, each uploads half of them a step, and the step equals the single-process
    offloaded one (each rank measures one probe: a forward of R rows instead of 2R)."""
    from test_parallel import _torchrun

    script = tmp_path / "ranks.py"
    script.write_text(_SLICED_RANKS.format(tests=str(Path(__file__).parent), model=str(tiny_model_dir),
                                           out=str(tmp_path)))
    done = _torchrun("--standalone", "--nproc-per-node", "2", str(script), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model, engine = _offloaded(tiny_model_dir, "nf4")
    want = ZOOptimizer(model, lr=1e-3, eps=1e-2, seed=0, offload=engine).step(_batch(0, model.config.vocab_size))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    (size,) = {b.flat.numel() for b in engine.blocks}  # the tiny Llama's two blocks are alike
    for rec in ranks:
        assert rec["slices"] == 2 and rec["uploads"] >= 2 and rec["block_sizes"] == [size]
        assert 2 * rec["bytes_up"] == rec["uploads"] * size  # half of every block it uploaded
        assert rec["losses"][0] == pytest.approx(want.losses[0], abs=1e-5)  # the step's one forward: (L+, L-)
        assert rec["grads"] == pytest.approx(want.projected_grads, abs=1e-3)


_SLICED_RANKS = """
import hashlib, json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_quantized import _batch, _qlora
from distzo import parallel
from distzo.offload import OffloadConfig, OffloadEngine
from distzo.optimizer import ZOOptimizer

mesh = parallel.init(parallel.ParallelConfig(pert=2, dir=1, data=1, timeout_s=60), "cpu")  # gloo, on any machine
model = _qlora(Path({model!r}), "nf4")
engine = OffloadEngine(model, "cpu", OffloadConfig("cpu"), slices=parallel.node_slices(mesh))
digest = hashlib.sha256(b"".join(bytes(b.flat.numpy()) for b in engine.blocks)).hexdigest()
opt = ZOOptimizer(model, lr=1e-3, eps=1e-2, seed=0, offload=engine, mesh=mesh)
stats = opt.step(_batch(0, model.config.vocab_size))
rec = dict(slices=engine.slices.size, bytes_up=engine.bytes_up, uploads=engine.uploads, losses=stats.losses,
           grads=stats.projected_grads, digest=digest, block_sizes=sorted({{b.flat.numel() for b in engine.blocks}}))
Path({out!r}, f"rank{{mesh.rank}}.json").write_text(json.dumps(rec))
mesh.close()
"""


def _steps(out: Path) -> list[tuple]:
    return [(r["loss"], r["grads"]) for r in TrajectoryLog(out / "trajectory.jsonl").read()]


def test_offloaded_train_equals_the_resident_run(bnb, run, offloaded_run):
    assert _steps(offloaded_run) == _steps(run) and len(set(_losses(run))) == 4
    assert json.loads((offloaded_run / "results.json").read_text())["final"] == json.loads(
        (run / "results.json").read_text())["final"]
    assert _same_tensors(offloaded_run / ADAPTER, run / ADAPTER)
    assert (offloaded_run / "checkpoints" / "last" / QUANTIZED_BASE_FILE).is_file()


def test_offloaded_resume_continues_step_for_step(bnb, offloaded_run, tiny_model_dir, sst2_dir, tmp_path):
    split = tmp_path / "split"
    assert main(_args(tiny_model_dir, sst2_dir, split, "--steps", "2", "--offload", "cpu")) == 0
    assert main(_args(tiny_model_dir, sst2_dir, split, "--steps", "4", "--resume")) == 0
    assert load_config(None, {"output_dir": str(split), "resume": True}).offload.mode == "cpu"
    assert _steps(split) == _steps(offloaded_run)
    assert _same_tensors(split / ADAPTER, offloaded_run / ADAPTER)


def test_offloaded_replay_rebuilds_the_adapter_bit_for_bit(bnb, offloaded_run, tiny_model_dir, tmp_path):
    # replay loads the base resident: the header's fingerprint, taken once the engine held the base, agrees
    rebuilt = replay(str(tiny_model_dir), offloaded_run / "trajectory.jsonl", tmp_path / "rebuilt").output
    assert _same_tensors(rebuilt / "adapter" / "adapter_model.safetensors", offloaded_run / ADAPTER)


def _rewrite_header(run: Path, dest: Path, **quantize) -> Path:
    """``run``'s log with its quantization record changed as ``quantize`` says (None: the field dropped)."""
    lines = (run / "trajectory.jsonl").read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    record = first["header"]["extra"]["quantize"] | quantize
    first["header"]["extra"]["quantize"] = {k: v for k, v in record.items() if v is not None}
    dest.write_text(json.dumps(first) + "\n" + "".join(lines[1:]))
    return dest


def test_replay_builds_the_base_the_log_records(bnb, run, tiny_model_dir, tmp_path, capsys):
    # another quantization of the same weights is another base: the fingerprint refuses it
    fp4 = _rewrite_header(run, tmp_path / "fp4.jsonl", type="fp4")
    err = refused(capsys, ["replay", str(tiny_model_dir), str(fp4), "--output", str(tmp_path / "a")])
    assert "is not the base model of this log's run" in err
    odd = _rewrite_header(run, tmp_path / "odd.jsonl", storage="bfloat16")
    err = refused(capsys, ["replay", str(tiny_model_dir), str(odd), "--output", str(tmp_path / "b")])
    assert "which this distzo does not build" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_log_that_does_not_say_where_its_base_was_quantized_replays(bnb, run, tiny_model_dir, tmp_path):
    # an older distzo's record: the base is rebuilt where replay loads it, as that distzo did
    older = _rewrite_header(run, tmp_path / "older.jsonl", quantized_on=None)
    rebuilt = replay(str(tiny_model_dir), older, tmp_path / "rebuilt").output
    assert _same_tensors(rebuilt / "adapter" / "adapter_model.safetensors", run / ADAPTER)
    assert "quantized_on" not in json.loads((rebuilt / QUANTIZED_BASE_FILE).read_text())["quantization"]


def test_an_older_run_resumes(bnb, run, tiny_model_dir, sst2_dir, tmp_path):
    older, newer = tmp_path / "older", tmp_path / "newer"
    for folder in (older, newer):
        shutil.copytree(run, folder)
    _rewrite_header(run, older / "trajectory.jsonl", quantized_on=None)
    config = older / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if "quantize_on:" not in line))
    for folder in (older, newer):
        assert main(_args(tiny_model_dir, sst2_dir, folder, "--steps", "6", "--resume")) == 0
    assert _losses(older) == _losses(newer) and len(_losses(older)) == 6
    assert "quantized_on" not in TrajectoryLog(older / "trajectory.jsonl").header().extra["quantize"]


def test_an_nf4_base_quantized_on_a_gpu_replays_anywhere(bnb, run, tiny_model_dir, tmp_path):
    # bitsandbytes' CPU and GPU kernels give NF4 the same bits: without a GPU it is rebuilt on the CPU
    on_gpu = _rewrite_header(run, tmp_path / "gpu.jsonl", quantized_on="cuda")
    rebuilt = replay(str(tiny_model_dir), on_gpu, tmp_path / "rebuilt").output
    assert _same_tensors(rebuilt / "adapter" / "adapter_model.safetensors", run / ADAPTER)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a GPU")
def test_an_fp4_base_quantized_on_a_gpu_is_not_rebuilt_without_one(bnb, run, tiny_model_dir, tmp_path, capsys):
    # FP4 and int8 get other bits from the CPU kernels: one line, nothing written
    on_gpu = _rewrite_header(run, tmp_path / "gpu.jsonl", type="fp4", quantized_on="cuda")
    err = refused(capsys, ["replay", str(tiny_model_dir), str(on_gpu), "--output", str(tmp_path / "out")])
    assert "quantized to fp4 on a GPU" in err and "needs a CUDA device" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="int8 on a GPU"):
        load_model(ModelConfig(name=str(tiny_model_dir), device="cpu", quantize="int8", quantize_on="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quantize", ["fp4", "int8"])
def test_an_offloaded_run_replays_on_its_gpu_bit_for_bit(bnb, tiny_model_dir, sst2_dir, tmp_path, quantize):
    # its base was quantized on the CPU, where replay on the GPU quantizes it again (bitsandbytes' GPU
    # kernels would give fp4 and int8 other bits, and the fingerprint would refuse the base)
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "3", "--quantize", quantize, "--offload", "cpu")) == 0
    assert TrajectoryLog(out / "trajectory.jsonl").header().extra["quantize"]["quantized_on"] == "cpu"
    rebuilt = replay(str(tiny_model_dir), out / "trajectory.jsonl", tmp_path / "rebuilt", device="cuda").output
    assert _same_tensors(rebuilt / "adapter" / "adapter_model.safetensors", out / ADAPTER)


def test_double_quantization_through_the_entry_point(bnb, tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "dq"
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "3", "--double-quant", "true")) == 0
    record = TrajectoryLog(out / "trajectory.jsonl").header().extra["quantize"]
    assert record["double_quant"] is True
    recipe = json.loads((out / "checkpoints" / "last" / QUANTIZED_BASE_FILE).read_text())
    assert recipe["quantization"] == record and recipe["quantization_config"]["bnb_4bit_use_double_quant"] is True
    assert "double_quant=True" in (out / "checkpoints" / "last" / "README.md").read_text()
    rebuilt = replay(str(tiny_model_dir), out / "trajectory.jsonl", tmp_path / "rebuilt").output
    assert _same_tensors(rebuilt / "adapter" / "adapter_model.safetensors", out / ADAPTER)


@pytest.mark.parametrize("quantize", ["int8", None])
def test_double_quantization_of_what_is_not_4_bit_is_one_line(tiny_model_dir, tmp_path, capsys, quantize):
    extra = ["--lora", "--double-quant", "true"] + (["--quantize", quantize] if quantize else [])
    err = refused(capsys, _plain_args(tiny_model_dir, tmp_path / "o", *extra))
    assert "model.double_quant applies to the 4-bit formats" in err
    assert not (tmp_path / "o").exists()


def test_resume_cannot_change_the_quantization(bnb, run, tiny_model_dir, sst2_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    err = refused(capsys, _args(tiny_model_dir, sst2_dir, copy, "--steps", "6", "--resume", "--quantize", "fp4"))
    assert "model.quantize ('nf4' -> 'fp4') cannot change" in err


# --------------------------------------------------------------------------- refusals (no bitsandbytes needed)


def _plain_args(model_dir, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--output-dir", str(out), "--progress", "false", *extra]


def test_quantize_without_lora_is_one_line(tiny_model_dir, tmp_path, capsys):
    err = refused(capsys, _plain_args(tiny_model_dir, tmp_path / "o", "--quantize", "nf4", "--lora", "false"))
    assert "model.quantize nf4 needs LoRA (--lora)" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_quantize_with_offload_is_accepted(quantize):
    cfg = load_config(None, {"model.quantize": quantize, "use_lora": True, "offload.mode": "cpu",
                             "offload.gpu_memory": "18GiB"})
    assert (cfg.model.quantize, cfg.use_lora, cfg.offload.mode, cfg.offload.gpu_memory) == (quantize, True, "cpu",
                                                                                           "18GiB")


def test_quantize_with_offload_still_needs_lora(tiny_model_dir, tmp_path, capsys):
    err = refused(capsys, _plain_args(tiny_model_dir, tmp_path / "o", "--quantize", "int8", "--lora", "false",
                                       "--offload", "cpu"))
    assert "model.quantize int8 needs LoRA (--lora)" in err and not (tmp_path / "o").exists()


def test_unknown_quantization_is_one_line(tiny_model_dir, tmp_path, capsys):
    err = refused(capsys, _plain_args(tiny_model_dir, tmp_path / "o", "--quantize", "int4", "--lora"))
    assert "model.quantize must be one of nf4, fp4, int8" in err


def test_missing_bitsandbytes_says_what_to_install(tiny_model_dir, sst2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec reports it absent
    err = refused(capsys, _args(tiny_model_dir, sst2_dir, tmp_path / "o", "--steps", "1"))
    assert "pip install 'distzo[quant]'" in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_gguf_base_is_dequantized_then_quantized(bnb, tmp_path):
    # the packaged GGUF file given as a path: dequantized into the cache, loaded quantized, the folder removed
    from distzo.models import packaged_gguf

    gguf = packaged_gguf()
    model, _ = load_model(ModelConfig(name=str(gguf), device="cpu", quantize="nf4", cache_dir=str(tmp_path)))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.name_or_path == str(gguf) and list(tmp_path.iterdir()) == []
