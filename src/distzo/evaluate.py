"""Evaluation: candidate accuracy, generation F1/EM, and mean loss.

Classification follows MeZO: each candidate is scored by the mean log-probability of its
tokens after the prompt and the best-scoring one is the prediction. Generation decodes
greedily and scores the first line against every acceptable answer with SQuAD's F1 and
exact match. LM and SFT tasks report the mean token loss.
"""

from __future__ import annotations

import inspect
import re
import string
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from distzo.losses import IGNORE_INDEX, candidate_scores, token_nll
from distzo.tasks.base import Example, Task
from distzo.tasks.collate import collate_classification, collate_prompts, collate_train, pad_id


def evaluate(
    model,
    tokenizer,
    task: Task | str,
    examples: Sequence[Example],
    batch_size: int | None = None,
    max_length: int = 256,
    max_new_tokens: int = 50,
) -> dict[str, float]:
    """The task's metric on ``examples``: {"accuracy"}, {"f1", "em"} or {"loss"}, by the task's kind."""
    kind = task if isinstance(task, str) else task.kind
    size = {} if batch_size is None else {"batch_size": batch_size}
    if kind == "classification":
        return {"accuracy": accuracy(model, tokenizer, examples, max_length=max_length, **size)}
    if kind == "generation":
        return generation_scores(
            model, tokenizer, examples, max_new_tokens=max_new_tokens, max_length=max_length, **size
        )
    if kind == "lm":
        return {"loss": mean_loss(model, tokenizer, examples, max_length=max_length, **size)}
    raise ValueError(f"unknown task kind {kind!r}")


@torch.no_grad()
def accuracy(model, tokenizer, examples: Sequence[Example], batch_size: int = 32, max_length: int = 256) -> float:
    """Share of examples whose gold candidate scores highest; ``batch_size`` counts examples."""
    if any(e.gold is None for e in examples):
        raise ValueError("accuracy needs a gold candidate on every example")
    scores = score_candidates(model, tokenizer, examples, batch_size, max_length)
    hits = [int(s.argmax()) == e.gold for s, e in zip(scores, examples)]
    return sum(hits) / max(len(hits), 1)


@torch.no_grad()
def score_candidates(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 32, max_length: int = 256
) -> list[torch.Tensor]:
    """Each example's candidate scores (mean token log-probability), one forward per batch.

    Where every candidate of a batch is a single token, a batch has one row per example
    and the model computes the vocabulary projection for the last position only.
    Otherwise there is a row per candidate, left-padded so all candidates end at the
    last position, and a model that takes ``logits_to_keep`` projects only the last
    few positions instead of producing (rows, length, vocab) logits.
    """
    # Batch examples of similar length together (padding is computed like real tokens),
    # then hand the scores back in the caller's order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    out: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    with eval_mode(model):
        for chunk in batches(order, batch_size):
            batch = collate_classification([examples[i] for i in chunk], tokenizer, max_length, fallback_side="left")
            shared = "candidate_ids" in batch
            keep = batch["logits_to_keep"] if shared else _answer_span(batch["labels"])
            logits = forward_logits(model, batch, keep_last=keep)
            scores = candidate_scores(logits, batch).cpu()
            for i, row, n in zip(chunk, scores, batch["num_candidates"].tolist()):
                out[i] = row[:n]
    return out


@torch.no_grad()
def generation_scores(
    model,
    tokenizer,
    examples: Sequence[Example],
    max_new_tokens: int = 50,
    batch_size: int = 8,
    max_length: int = 256,
    stop: str = "\n",
) -> dict[str, float]:
    """Mean best-over-answers F1 and exact match of greedy generations, cut at ``stop``."""
    predictions = generate(model, tokenizer, examples, max_new_tokens, batch_size, max_length, stop)
    f1 = [max(f1_score(p, a) for a in e.answers) for p, e in zip(predictions, examples) if e.answers]
    em = [max(exact_match(p, a) for a in e.answers) for p, e in zip(predictions, examples) if e.answers]
    if len(f1) < len(examples):
        raise ValueError("generation scores need at least one answer on every example")
    n = max(len(f1), 1)
    return {"f1": sum(f1) / n, "em": sum(em) / n}


@torch.no_grad()
def generate(
    model,
    tokenizer,
    examples: Sequence[Example],
    max_new_tokens: int = 50,
    batch_size: int = 8,
    max_length: int = 256,
    stop: str | None = "\n",
) -> list[str]:
    """Greedy continuations of the prompts (left-padded, so new tokens line up), cut at ``stop``."""
    if max_length <= max_new_tokens:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt and {max_new_tokens} new tokens")
    device = model_device(model)
    texts: list[str] = []
    with eval_mode(model):
        for chunk in batches(examples, batch_size):
            batch = collate_prompts(chunk, tokenizer, max_length - max_new_tokens)
            ids = batch["input_ids"].to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id(tokenizer),
            )
            texts += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [(t.split(stop)[0] if stop else t).strip() for t in texts]


@torch.no_grad()
def mean_loss(model, tokenizer, examples: Sequence[Example], batch_size: int = 16, max_length: int = 256) -> float:
    """Mean NLL per target token over all examples (a long example weighs by its tokens)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for chunk in batches(examples, batch_size):
            batch = collate_train(chunk, tokenizer, "lm", max_length)
            nll, _ = token_nll(forward_logits(model, batch), batch["labels"])
            total += float(nll.sum())
            count += nll.numel()
    if count == 0:
        raise ValueError("no target tokens to compute a loss on")
    return total / count


def forward_logits(model, batch: dict[str, torch.Tensor], keep_last: int | None = None) -> torch.Tensor:
    """The model's logits for a batch; only the last ``keep_last`` positions where the model allows it.

    Position ids are passed from the attention mask so left padding does not shift the
    positions of real tokens.
    """
    device = model_device(model)
    mask = batch["attention_mask"].to(device)
    kwargs = {"input_ids": batch["input_ids"].to(device), "attention_mask": mask}
    accepted = inspect.signature(model.forward).parameters
    if "position_ids" in accepted:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    if keep_last is not None and "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = keep_last
    return model(**kwargs).logits


def _answer_span(labels: torch.Tensor) -> int:
    """Positions whose logits the loss reads: from the one before the first label column to the end."""
    columns = (labels != IGNORE_INDEX).any(0).nonzero()
    if columns.numel() == 0:
        return labels.shape[1]
    return labels.shape[1] - max(int(columns[0]) - 1, 0)


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    if size < 1:
        raise ValueError(f"batch_size must be positive, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def model_device(model) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Evaluate without dropout, then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def f1_score(prediction: str, answer: str) -> float:
    """Token-overlap F1 of the normalised strings; two empty strings agree (1.0)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
