"""LoRA adapters trained by ZO over a base quantized by bitsandbytes (nf4, fp4, int8) on CPU.

The engine against the reference step over the adapters of the same quantized model, then the real
entry point: its checkpoints (adapter + the base's recipe, no merged model), resume and replay bit
for bit, and the one-line refusals.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from reference_mezo import mezo_step
from safetensors.torch import load_file

from distzo.checkpoint import BaseIdentity, TrajectoryLog
from distzo.cli import main
from distzo.models import QUANTIZED_BASE_FILE, LoraSettings, ModelConfig, apply_lora, load_model
from distzo.optimizer import ZOOptimizer, causal_lm_loss
from distzo.replay import replay

ADAPTER = Path("checkpoints") / "last" / "adapter" / "adapter_model.safetensors"


@pytest.fixture
def bnb():
    """Only the tests that quantize need bitsandbytes (an optional extra, in the test extra)."""
    return pytest.importorskip("bitsandbytes")


def _qlora(model_dir: Path, quantize: str):
    """The tiny Llama quantized at load, with adapters seeded as the trainer seeds them."""
    model, _ = load_model(ModelConfig(name=str(model_dir), device="cpu", quantize=quantize))
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


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_matches_reference_over_the_adapters(bnb, tiny_model_dir, quantize):
    engine, ref = _qlora(tiny_model_dir, quantize), _qlora(tiny_model_dir, quantize)
    frozen = _frozen(engine)
    assert all(p.dtype in (torch.uint8, torch.int8) for n, p in frozen.items() if "q_proj.base_layer" in n)
    opt = ZOOptimizer(engine, lr=5e-2, eps=1e-2, seed=0)
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
                                        "double_quant": False, "storage": "uint8"}
    assert header.environment["bitsandbytes"] == bnb.__version__
    last = run / "checkpoints" / "last"
    assert not (last / "model.safetensors").exists()  # no lossy merge into 4 bits
    recipe = json.loads((last / QUANTIZED_BASE_FILE).read_text())
    assert recipe["base_model"] == str(tiny_model_dir) and recipe["quantization"] == header.extra["quantize"]
    assert recipe["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert "library_name: peft" in (last / "README.md").read_text()
    assert len(set(_losses(run))) == 4  # the adapters moved

    # what the model card says to do: the base rebuilt as recorded, the adapter over it
    base, _ = load_model(ModelConfig(recipe["base_model"], dtype=recipe["dtype"], quantize="nf4"))
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


def test_replay_rebuilds_the_adapter_bit_for_bit(bnb, run, tiny_model_dir, tmp_path):
    rebuilt = replay(str(tiny_model_dir), run / "trajectory.jsonl", tmp_path / "rebuilt").output
    assert _same_tensors(rebuilt / "adapter" / "adapter_model.safetensors", run / ADAPTER)
    assert (rebuilt / QUANTIZED_BASE_FILE).is_file() and not (rebuilt / "model.safetensors").exists()


def test_a_quantized_checkpoint_is_not_taken_for_a_model(bnb, run, tmp_path, capsys):
    err = _refused(capsys, ["eval", "--model", str(run / "checkpoints" / "last"), "--task", "sst2"])
    assert "checkpoint of a run on a quantized base" in err and QUANTIZED_BASE_FILE in err


def _rewrite_header(run: Path, dest: Path, **quantize) -> Path:
    lines = (run / "trajectory.jsonl").read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["header"]["extra"]["quantize"] |= quantize
    dest.write_text(json.dumps(first) + "\n" + "".join(lines[1:]))
    return dest


def _refused(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distzo: error: ") and "\n" not in err, err
    return err


def test_replay_builds_the_base_the_log_records(bnb, run, tiny_model_dir, tmp_path, capsys):
    # another quantization of the same weights is another base: the fingerprint refuses it
    fp4 = _rewrite_header(run, tmp_path / "fp4.jsonl", type="fp4")
    err = _refused(capsys, ["replay", str(tiny_model_dir), str(fp4), "--output", str(tmp_path / "a")])
    assert "is not the base model of this log's run" in err
    odd = _rewrite_header(run, tmp_path / "odd.jsonl", double_quant=True)
    err = _refused(capsys, ["replay", str(tiny_model_dir), str(odd), "--output", str(tmp_path / "b")])
    assert "which this distzo does not build" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_cannot_change_the_quantization(bnb, run, tiny_model_dir, sst2_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    err = _refused(capsys, _args(tiny_model_dir, sst2_dir, copy, "--steps", "6", "--resume", "--quantize", "fp4"))
    assert "model.quantize ('nf4' -> 'fp4') cannot change" in err


# --------------------------------------------------------------------------- refusals (no bitsandbytes needed)


def _plain_args(model_dir, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--output-dir", str(out), "--progress", "false", *extra]


def test_quantize_without_lora_is_one_line(tiny_model_dir, tmp_path, capsys):
    err = _refused(capsys, _plain_args(tiny_model_dir, tmp_path / "o", "--quantize", "nf4", "--lora", "false"))
    assert "model.quantize nf4 needs LoRA (--lora)" in err
    assert not (tmp_path / "o").exists()


def test_quantize_with_offload_is_one_line(tiny_model_dir, tmp_path, capsys):
    err = _refused(capsys, _plain_args(tiny_model_dir, tmp_path / "o", "--quantize", "int8", "--lora",
                                       "--offload", "cpu"))
    assert "does not work with offload yet" in err and not (tmp_path / "o").exists()


def test_unknown_quantization_is_one_line(tiny_model_dir, tmp_path, capsys):
    err = _refused(capsys, _plain_args(tiny_model_dir, tmp_path / "o", "--quantize", "int4", "--lora"))
    assert "model.quantize must be one of nf4, fp4, int8" in err


def test_missing_bitsandbytes_says_what_to_install(tiny_model_dir, sst2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec reports it absent
    err = _refused(capsys, _args(tiny_model_dir, sst2_dir, tmp_path / "o", "--steps", "1"))
    assert "pip install 'distzo[quant]'" in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_gguf_base_is_dequantized_then_quantized(bnb, tmp_path):
    # the packaged GGUF file given as a path: dequantized into the cache, loaded quantized, the folder removed
    from distzo.models import packaged_gguf

    gguf = packaged_gguf()
    model, _ = load_model(ModelConfig(name=str(gguf), device="cpu", quantize="nf4", cache_dir=str(tmp_path)))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.name_or_path == str(gguf) and list(tmp_path.iterdir()) == []
