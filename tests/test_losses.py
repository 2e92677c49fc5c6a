"""Losses against direct computations: HF's own causal-LM loss and hand-built candidate scores."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distzo.losses import candidate_loss, candidate_scores, default_loss, lm_loss, per_row_token_nll

VOCAB = 97


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
