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
    """A random model of ``family``; in float64 it computes in float64 throughout (see below)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).to(dtype)
    model.config.use_cache = False
    if dtype == torch.float64:
        model = float64_throughout(model)
    return model.eval()


class Float64RMSNorm(torch.nn.Module):
    """An RMSNorm computed in its input's dtype, with the weight of the norm it replaces."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_throughout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (float64) with its Llama-style RMSNorms computed in float64, for tests against the reference.

    transformers' RMSNorm rounds its input to float32. In a float64 model that rounding turns
    an ulp-level difference between two computations of one loss (MeZO's in-place drift, a
    data shard's matmul of fewer rows, another CPU's kernels) into a jump of ~1e-10 whenever it
    crosses a float32 rounding boundary, which happens on some machines and not on others. In
    float64 throughout, engine and reference agree to ~1e-15 on every machine. (The rotary
    embedding's float32 angles are a function of the positions alone: one machine computes
    the same ones for every batch.)
    """
    norms = [name for name, m in model.named_modules()
             if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")]
    for name in norms:  # the same parameters under the same names, in the same order
        model.set_submodule(name, Float64RMSNorm(model.get_submodule(name)))
    return model


def tiny_batch(rows: int = 3, seq: int = 7, seed: int = 0, padded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    if padded and rows > 1:
        mask[-1, -2:] = 0  # a right-padded row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
