"""An NF4 base computed in float8 (``model.base_compute fp8``): the kernels against torch's own casts,
a layer against float32 arithmetic on its fp8 operands, ZO over the adapters against the reference step,
the real entry point with its records, replay and resume, and the refusals (those on the CPU)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from one_line import refused
from safetensors.torch import load_file
from test_linear4bit import _quantized

from distzo.checkpoint import TrajectoryLog
from distzo.cli import main
from distzo.linear4bit import _fp8_forward, _has_fast_forward, check_fp8_compute, dequantize_nf4, fast_nf4_forward
from distzo.models import (QUANTIZED_BASE_FILE, LoraSettings, ModelConfig, apply_lora, load_model,
                           quantization_settings, recorded_quantize)
from distzo.optimizer import ZOOptimizer
from distzo.replay import replay
from distzo.rundir import changed_settings

has_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
fp8_gpu = pytest.mark.skipif(not has_fp8, reason="needs a CUDA GPU with fp8 tensor cores")
ADAPTER = Path("checkpoints") / "last" / "adapter" / "adapter_model.safetensors"
E4M3 = torch.float8_e4m3fn


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def _args(model_dir, data_dir, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--quantize", "nf4", "--base-compute", "fp8", "--lora",
            "--lora.r", "2", "--task", "sst2", "--data", str(data_dir), "--output-dir", str(out),
            "--task.num_train", "32", "--task.num_dev", "8", "--task.num_test", "8", "--batch-size", "4",
            "--lr", "1e-1", "--eps", "1e-2", "--progress", "false", "--tensorboard", "false", "--zero_shot", "false",
            *extra]


# --------------------------------------------------------------------------- settings and refusals (CPU)


@pytest.mark.parametrize("extra,message", [
    (["--quantize", "int8"], "model.base_compute fp8 computes an NF4 base (model.quantize nf4), not int8"),
    ([], "model.base_compute fp8 computes an NF4 base (model.quantize nf4), not an unquantized one"),
    (["--quantize", "nf4", "--base-compute", "fp16"], "model.base_compute must be one of fp8 (or none), got 'fp16'"),
    (["--quantize", "nf4", "--optim.first_order", "lm_head"], "optim.first_order backpropagates through the base"),
])
def test_settings_that_cannot_compute_in_fp8_are_one_line(tiny_model_dir, tmp_path, capsys, extra, message):
    argv = ["train", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"), "--progress", "false",
            "--lora", "--base-compute", "fp8", *extra]
    assert message in refused(capsys, argv)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(has_fp8, reason="checks the refusal where no fp8 GPU is")
def test_fp8_compute_without_an_fp8_gpu_is_one_line_and_writes_nothing(bnb, tiny_model_dir, sst2_dir, tmp_path,
                                                                       capsys):
    err = refused(capsys, _args(tiny_model_dir, sst2_dir, tmp_path / "o", "--steps", "1"))
    assert "model.base_compute fp8 needs a CUDA GPU with fp8 tensor cores" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="has none"):
        check_fp8_compute(torch.device("cpu"))


@pytest.fixture(scope="module")
def cpu_run(tiny_model_dir, sst2_dir, tmp_path_factory) -> Path:
    """A finished 2-step NF4 run on the CPU (its base computed in float32). Read-only."""
    out = tmp_path_factory.mktemp("nf4") / "run"
    argv = [a for a in _args(tiny_model_dir, sst2_dir, out, "--steps", "2") if a not in ("--base-compute", "fp8")]
    assert main(argv) == 0
    return out


@pytest.mark.skipif(has_fp8, reason="checks the refusal where no fp8 GPU is")
def test_replay_and_eval_of_an_fp8_run_need_an_fp8_gpu(bnb, cpu_run, tiny_model_dir, tmp_path, capsys):
    lines = (cpu_run / "trajectory.jsonl").read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["header"]["extra"]["quantize"]["base_compute"] = "fp8"  # as an fp8 run records its base
    log = tmp_path / "fp8.jsonl"
    log.write_text(json.dumps(first) + "\n" + "".join(lines[1:]))
    err = refused(capsys, ["replay", str(tiny_model_dir), str(log), "--output", str(tmp_path / "out")])
    assert "model.base_compute fp8 needs a CUDA GPU with fp8 tensor cores" in err and not (tmp_path / "out").exists()
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(cpu_run / "checkpoints" / "last", checkpoint)
    recipe = json.loads((checkpoint / QUANTIZED_BASE_FILE).read_text())
    recipe["quantization"]["base_compute"] = "fp8"
    (checkpoint / QUANTIZED_BASE_FILE).write_text(json.dumps(recipe))
    err = refused(capsys, ["eval", "--model", str(checkpoint), "--task", "sst2", "--split", "test",
                            "--num-examples", "4"])
    assert "model.base_compute fp8 needs a CUDA GPU with fp8 tensor cores" in err


def test_the_record_says_fp8_and_rebuilds_it():
    settings = quantization_settings("nf4", "bfloat16", "cuda", base_compute="fp8")
    assert settings["base_compute"] == "fp8"
    assert recorded_quantize(settings, "bfloat16", "a test")["base_compute"] == "fp8"
    older = quantization_settings("nf4", "bfloat16", "cuda")  # a record without the field: computed in its dtype
    assert "base_compute" not in older and recorded_quantize(older, "bfloat16", "a test")["base_compute"] is None


def test_a_resume_cannot_change_the_base_compute():
    _, refused = changed_settings({"model": {"base_compute": None}}, {"model": {"base_compute": "fp8"}})
    assert refused == {"model.base_compute": [None, "fp8"]}


def test_the_fp8_forward_goes_on_the_nf4_layers_whose_shape_it_takes(bnb, wide_model_dir, tiny_model_dir):
    model, _ = load_model(ModelConfig(name=str(wide_model_dir), device="cpu", quantize="nf4"))
    fast_nf4_forward(model, fp8=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(_has_fast_forward(m) and m.forward.func is _fp8_forward for m in layers)
    with pytest.raises(ValueError, match="needs a CUDA GPU with fp8 tensor cores"), torch.no_grad():
        layers[0](torch.zeros(2, layers[0].in_features))  # on the CPU: one line, not bitsandbytes' arithmetic
    narrow, _ = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu", quantize="nf4"))
    with pytest.raises(ValueError, match=r"input width a multiple of 16 and of the blocksize \(64\); .* is 32 -> "):
        fast_nf4_forward(narrow, fp8=True)  # the tiny model's 32-wide rows are half a scale block


# --------------------------------------------------------------------------- the kernels (GPU)


def _fp8_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` in float32 times 448 over its largest magnitude, cast by torch; and the rows x 1
    scales back."""
    x = x.float()
    peak = x.abs().amax(1, keepdim=True).clamp(min=2.0**-100)
    top = torch.tensor(448.0, device=x.device)
    return (x * (top / peak)).to(E4M3), peak / top


def _fp8_weight_reference(bnb, codes, state) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight in float32 as bitsandbytes dequantizes it (table value times absmax), its rows as
    ``_fp8_rows_reference`` makes them; and the 1 x n scales back."""
    state = copy.copy(state)  # dequantized in float32, the caller's state left as it is
    state.dtype = torch.float32
    weight, scale = _fp8_rows_reference(bnb.functional.dequantize_4bit(codes, state))
    return weight, scale.view(1, -1)


@pytest.mark.gpu
@fp8_gpu
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(512, 768), (48, 1088)])  # whole programs; a tail past the last
@pytest.mark.parametrize("aligned", [True, False])  # False: codes that do not start on a 4-byte word
def test_an_nf4_weight_dequantizes_to_fp8_as_torch_casts_it(bnb, nested, shape, aligned):
    from distzo.linear4bit import _fp8_row_scales

    codes, state = _quantized(bnb, shape, 64, nested)
    if not aligned:
        shifted = torch.empty(codes.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
        codes = shifted.copy_(codes.view(-1)).view(codes.shape)
    inv, scale = _fp8_row_scales(torch.nn.Module(), state, torch.device("cuda", torch.cuda.current_device()))
    ours = dequantize_nf4(codes, state, E4M3, inv)
    want, want_scale = _fp8_weight_reference(bnb, codes, state)
    assert torch.equal(scale, want_scale)
    assert ours.shape == shape and torch.equal(ours.view(torch.uint8), want.view(torch.uint8))
    assert int(ours.float().abs().amax(1).min()) == 448  # every row spans e4m3's range


@pytest.mark.gpu
@fp8_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width", [1000, 4096, 5000])  # a partial block; whole ones; several and a partial
def test_activation_rows_quantize_as_torch_casts_them(dtype, width):
    from distzo.kernels.fp8 import quantize_rows

    torch.manual_seed(0)
    x = (torch.randn(37, width, device="cuda") * torch.logspace(-3, 3, 37, device="cuda")[:, None]).to(dtype)
    x[5] = 0  # a row of zeros stays zeros
    x[9, 17] = float("nan")  # and a NaN makes its row NaN
    codes, scale = quantize_rows(x)
    want, want_scale = _fp8_rows_reference(x)
    finite = torch.ones(37, dtype=torch.bool, device="cuda")
    finite[9] = False
    assert torch.equal(scale[finite], want_scale[finite])
    assert torch.equal(codes[finite].view(torch.uint8), want[finite].view(torch.uint8))
    assert torch.equal(codes[5].float(), torch.zeros(width, device="cuda"))
    assert torch.isnan(scale[9]).all() and torch.isnan(codes[9].float()).all()


def _layer(bnb, k: int, n: int, compute_dtype=torch.bfloat16):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=compute_dtype, quant_type="nf4")
    torch.nn.init.normal_(layer.bias, std=0.1)
    layer.bias.requires_grad_(False)  # frozen, as in a base
    return layer.to("cuda")


@pytest.mark.gpu
@fp8_gpu
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 16, 1024])  # every row count computes in fp8, bitsandbytes' few-row ones too
def test_an_fp8_layer_is_float32_arithmetic_on_its_fp8_operands(bnb, compute_dtype, rows):
    from distzo.kernels.fp8 import quantize_rows

    layer = _layer(bnb, 768, 2304, compute_dtype)
    x = torch.randn(2, rows // 2 or 1, 768, device="cuda", dtype=compute_dtype)
    with torch.no_grad():
        bf16 = layer(x).float()  # bitsandbytes' forward, which also settles the compute dtype
        fast_nf4_forward(layer, fp8=True)
        ours = layer(x)
    codes, x_scale = quantize_rows(x.reshape(-1, 768))
    weight, w_scale = _fp8_weight_reference(bnb, layer.weight.data, layer.weight.quant_state)
    exact = (codes.float() * x_scale) @ (weight.float() * w_scale.view(-1, 1)).T  # float32, exact products
    want = exact.to(torch.bfloat16).to(compute_dtype) + layer.bias.to(compute_dtype)
    assert ours.dtype == x.dtype and ours.shape == (*x.shape[:-1], 2304)
    ours = ours.reshape(-1, 2304).float()
    # the GEMM sums in another order than the float32 reference, then rounds to bf16 once, as it does
    torch.testing.assert_close(ours, want.float(), rtol=2**-7, atol=2**-7 * float(want.abs().max()))
    # and it is the same layer: fp8 operands put it a few percent from bitsandbytes' bf16 output
    assert float((ours - bf16.reshape(-1, 2304)).norm() / bf16.norm()) < 0.06


@pytest.mark.gpu
@fp8_gpu
def test_no_gradient_goes_through_an_fp8_layer(bnb):
    layer = _layer(bnb, 256, 512)
    fast_nf4_forward(layer, fp8=True)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError, match="without a backward"):
        layer(x)


# --------------------------------------------------------------------------- ZO over the adapters (GPU)


def _torch_fp8_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The fp8 layer written with torch's own casts (the rows and the weight as the references above
    make them), the GEMM the same call."""
    n, k = layer.weight.quant_state.shape
    inp_dtype, x = x.dtype, x.to(layer.compute_dtype)
    codes, x_scale = _fp8_rows_reference(x.reshape(-1, k))
    weight, w_scale = _fp8_weight_reference(pytest.importorskip("bitsandbytes"), layer.weight.data,
                                            layer.weight.quant_state)
    out = torch._scaled_mm(codes, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16).to(x.dtype)
    if layer.bias is not None:
        out = out + layer.bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], n).to(inp_dtype)


def _fp8_qlora(model_dir: Path, written_in_torch: bool = False, base_compute: str | None = "fp8"):
    import functools

    model, _ = load_model(ModelConfig(name=str(model_dir), device="cuda", quantize="nf4", base_compute=base_compute))
    if written_in_torch:
        for module in model.modules():
            if _has_fast_forward(module):
                module.forward = functools.partial(_torch_fp8_forward, module)
    torch.manual_seed(0)
    return apply_lora(model, LoraSettings(r=2, alpha=4))


def _batch(step: int, vocab: int, rows: int = 4, seq: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0  # a right-padded row
    return {k: v.cuda() for k, v in {"input_ids": ids, "attention_mask": mask,
                                     "labels": ids.masked_fill(mask == 0, -100)}.items()}


def _zo_run(model, steps: int = 20, **options):
    """``steps`` ZO steps over ``model``'s adapters (``options``: more ZOOptimizer settings): each step's
    losses and projected gradients, and the adapters after."""
    opt = ZOOptimizer(model, lr=5e-2, eps=1e-2, seed=0, **options)
    losses = [(s.losses_plus, s.losses_other, s.projected_grads)
              for s in (opt.step(_batch(t, model.config.vocab_size)) for t in range(steps))]
    opt.flush()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _same_runs(a, b) -> bool:
    """Two ``_zo_run`` results: the same steps and adapters, bit for bit."""
    (steps, adapters), (their_steps, theirs) = a, b
    return (steps == their_steps and adapters.keys() == theirs.keys()
            and all(torch.equal(adapters[n].cpu(), theirs[n].cpu()) for n in adapters))


@pytest.mark.gpu
@fp8_gpu
@pytest.mark.parametrize("batch_streams", [False, True])
def test_zo_over_an_fp8_base_is_the_run_over_torchs_fp8_layers(bnb, wide_model_dir, batch_streams):
    """20 ZO steps with distzo's fp8 layers against the same steps with the layers written in torch: the
    same losses, projected gradients and adapters, bit for bit. (The engine itself is checked against the
    reference ZO step over a float32-computed base, tests/test_quantized.py: over an fp8 base the two
    cannot be compared to a few ulp, since one ulp of difference in a perturbed adapter can move an
    activation across an e4m3 rounding boundary, a 1/16 step.)"""
    engine = _fp8_qlora(wide_model_dir)
    assert all(m.forward.func is _fp8_forward for m in engine.modules() if isinstance(m, bnb.nn.Linear4bit))
    ours, trained = _zo_run(engine, batch_streams=batch_streams)
    theirs, reference = _zo_run(_fp8_qlora(wide_model_dir, written_in_torch=True), batch_streams=batch_streams)
    assert _same_runs((ours, trained), (theirs, reference)) and len({tuple(plus) for plus, _, _ in ours}) > 1
    assert any(float(p.abs().max()) > 1e-2 for n, p in trained.items() if "lora_B" in n)  # they trained
    in_dtype, _ = _zo_run(_fp8_qlora(wide_model_dir, base_compute=None), steps=2, batch_streams=batch_streams)
    assert in_dtype != ours[:2]  # and fp8 is what ran: the base computed in its dtype gives other losses


@pytest.mark.gpu
@fp8_gpu
def test_offloaded_fp8_blocks_equal_resident_ones(bnb, wide_model_dir):
    """A CPU-quantized NF4 base computed in fp8, resident on the GPU against streamed through it: each
    block's row scales come from its own uploaded scales, whichever slot it computes from."""
    from distzo.models import move_quantized
    from distzo.offload import OffloadConfig, OffloadEngine

    def built():
        model, _ = load_model(ModelConfig(name=str(wide_model_dir), device="cpu", quantize="nf4", base_compute="fp8"),
                              compute_device=torch.device("cuda"))
        torch.manual_seed(0)
        return apply_lora(model, LoraSettings(r=2, alpha=4))

    streamed = built()
    engine = OffloadEngine(streamed, "cuda", OffloadConfig("cpu"))
    resident = move_quantized(built(), torch.device("cuda"))
    assert _same_runs(_zo_run(resident, steps=10), _zo_run(streamed, steps=10, offload=engine))
    assert engine.bytes_up > 0 and engine.bytes_down == 0


@pytest.mark.gpu
@fp8_gpu
@pytest.mark.parametrize("batch_streams", [False, True])
def test_graph_steps_over_an_fp8_base_equal_eager_steps(bnb, wide_model_dir, batch_streams):
    eager = _zo_run(_fp8_qlora(wide_model_dir), steps=10, batch_streams=batch_streams)
    graphed = _zo_run(_fp8_qlora(wide_model_dir), steps=10, batch_streams=batch_streams, cuda_graphs=True)
    assert _same_runs(eager, graphed)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in TrajectoryLog(out / "trajectory.jsonl").read()]


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.gpu
@fp8_gpu
def test_fp8_compute_through_the_entry_point(bnb, wide_model_dir, sst2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(wide_model_dir, sst2_dir, run, "--steps", "4")) == 0
    record = TrajectoryLog(run / "trajectory.jsonl").header().extra["quantize"]
    assert record["base_compute"] == "fp8"
    recipe = json.loads((run / "checkpoints" / "last" / QUANTIZED_BASE_FILE).read_text())
    assert recipe["quantization"] == record
    assert "base_compute='fp8'" in (run / "checkpoints" / "last" / "README.md").read_text()
    assert len(set(_losses(run))) == 4
    # the same run computed in its dtype has other losses: the setting is what ran
    plain = tmp_path / "plain"
    assert main([a for a in _args(wide_model_dir, sst2_dir, plain, "--steps", "4") if a not in ("--base-compute",
                                                                                              "fp8")]) == 0
    assert _losses(plain) != _losses(run)
    rebuilt = replay(str(wide_model_dir), run / "trajectory.jsonl", tmp_path / "rebuilt").output
    assert _same_tensors(rebuilt / "adapter" / "adapter_model.safetensors", run / ADAPTER)
    split = tmp_path / "split"
    assert main(_args(wide_model_dir, sst2_dir, split, "--steps", "2")) == 0
    assert main(_args(wide_model_dir, sst2_dir, split, "--steps", "4", "--resume")) == 0
    assert _losses(split) == _losses(run) and _same_tensors(split / ADAPTER, run / ADAPTER)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    log = (copy / "trajectory.jsonl").read_bytes()
    argv = _args(wide_model_dir, sst2_dir, copy, "--steps", "6", "--resume", "--base-compute", "none")
    assert "model.base_compute ('fp8' -> None) cannot change" in refused(capsys, argv)
    assert (copy / "trajectory.jsonl").read_bytes() == log
