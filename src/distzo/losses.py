"""Losses of a batch from the model's logits, in float32.

ZO training reads the loss difference L(θ+εz) - L(θ-εz), a tiny number next to L
itself, so the losses are computed in float32 whatever the model's dtype. Logits can be
(R, S, 50k): only the positions that carry a label are gathered and upcast, so the
float32 copy is (label tokens, V), not the whole tensor.

Labels are aligned with input_ids; the logit at position t predicts the label at t+1.
The batch-level losses take the logits or the model's output itself, so they serve
directly as a ``loss_fn(outputs, batch)``.

Candidate batches come in two formats (see ``distzo.tasks.collate``): one row per
(example, candidate) with labels, or, when every candidate is a single token, one row
per example with ``candidate_ids``, scored from the logits of the last position alone.
Both give the same scores.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

# The label of a position without loss: cross_entropy's default ignore_index. Batches
# (distzo.tasks.collate) write it, the losses and evaluation read it.
IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every label token (float32) and the row it belongs to, both (N,).

    ``logits`` may cover only the last positions of each row (a model asked for a few
    positions' logits); the labels' last columns are then matched to them.
    """
    labels = labels[:, labels.shape[1] - logits.shape[1] :].to(logits.device)
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX
    picked = logits[:, :-1][where].float()
    nll = F.cross_entropy(picked, targets[where], reduction="none")
    rows = where.nonzero()[:, 0]
    return nll, rows


def per_row_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over each row's label tokens, (R,) float32; 0 for a row without labels."""
    nll, rows = token_nll(logits, labels)
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=nll.device).index_add_(0, rows, nll)
    count = torch.bincount(rows, minlength=labels.shape[0]).clamp_min(1)
    return total / count


def lm_loss(logits: torch.Tensor | Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL over all label tokens of the batch, as Hugging Face's causal-LM loss."""
    nll, _ = token_nll(_logits(logits), batch["labels"])
    return nll.mean()


def candidate_scores(logits: torch.Tensor | Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(E, C_max) scores: each candidate's mean log-probability per token, -inf past an example's candidates."""
    if "candidate_ids" in batch:
        return next_token_scores(_logits(logits), batch["candidate_ids"])
    scores = -per_row_token_nll(_logits(logits), batch["labels"])
    counts = batch["num_candidates"].to(scores.device)
    width = int(counts.max()) if counts.numel() else 0
    slot = torch.arange(width, device=scores.device)
    valid = slot[None, :] < counts[:, None]
    grid = torch.full(valid.shape, float("-inf"), dtype=scores.dtype, device=scores.device)
    return grid.masked_scatter(valid, scores)


def next_token_scores(logits: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """(E, C_max) float32 log-probabilities of single-token candidates at each row's last position.

    Rows are left-padded, so the last position is the prompt's last token whatever its
    length; ``candidate_ids`` is -1 past an example's candidates, which score -inf.
    """
    ids = candidate_ids.to(logits.device)
    logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
    scores = logp.gather(1, ids.clamp_min(0))
    return scores.masked_fill(ids < 0, float("-inf"))


def candidate_loss(logits: torch.Tensor | Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """MeZO's classification loss: cross-entropy of the gold candidate over the candidates' scores.

    A candidate's score is its mean token log-likelihood, so long and short answers
    compete on equal terms; examples may have different numbers of candidates. Takes
    either candidate format; the loss is the mean over examples.
    """
    scores = candidate_scores(logits, batch)
    return F.cross_entropy(scores, batch["gold"].to(scores.device))


def default_loss(logits: torch.Tensor | Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The candidate loss for candidate batches, else the LM loss."""
    return candidate_loss(logits, batch) if "gold" in batch else lm_loss(logits, batch)


def _logits(x: torch.Tensor | Any) -> torch.Tensor:
    return x if torch.is_tensor(x) else x.logits
