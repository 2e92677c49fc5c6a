"""Tiny random-init models of each supported family, for fast CPU tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 97
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")


def _config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    if family == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, num_key_value_heads=2)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, num_key_value_heads=2, head_dim=8)
    if family == "opt":
        return transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
            word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        )
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).to(dtype)
    model.config.use_cache = False
    return model.eval()


def tiny_batch(rows: int = 3, seq: int = 7, seed: int = 0, padded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    if padded and rows > 1:
        mask[-1, -2:] = 0  # a right-padded row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
