"""Fixtures shared by the test modules. Tests never reach the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Before transformers is imported anywhere: huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


TINY_WORDS = "the a movie film was is good bad great terrible plot acting not very".split()




@pytest.fixture(scope="session")
def packaged_model_dir(tmp_path_factory) -> Path:
    """The packaged SmolLM2-135M-Instruct converted once per test run (~20 s) into a
    private cache, so tests neither depend on nor touch the user's ~/.cache/distzo."""
    from distzo.models import packaged_model_dir as convert

    return convert(tmp_path_factory.mktemp("distzo-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (tied embeddings) with a word-level tokenizer that has no pad
    token, saved as an ordinary HF folder. Read-only: copy it before changing it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(TINY_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wide_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama's tokenizer over a wider model (hidden 256): layers wide enough that alignment
    padding is noise and every 4-bit row is whole quantization blocks. Read-only."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory) -> Path:
    """A local SST-2 copy in the hub's schema, written in the tiny model's vocabulary:
    a sentence is positive when it holds "good" or "great"."""
    import json
    import random

    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("sst2")
    for split, n in (("train", 64), ("validation", 16)):
        rows = []
        for i in range(n):
            words = rng.sample(TINY_WORDS, 5)
            rows.append({"sentence": " ".join(words), "label": int(bool({"good", "great"} & set(words))), "idx": i})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# Turns are "<role> : <content> </s>", so every assistant turn ends with the EOS token.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with the role names and ":" added to its vocabulary and a simple chat
    template (``TINY_CHAT_TEMPLATE``), so rendered conversations tokenise word by word. Read-only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["system", "user", "assistant", ":"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
