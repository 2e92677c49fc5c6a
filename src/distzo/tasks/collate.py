"""Examples to model batches.

Prompt and answer are tokenised separately and their ids concatenated, so the answer's
tokens are exactly its own tokenisation whatever precedes it (MeZO scores candidates
this way). The answer is never truncated; the prompt loses its beginning instead, since
the end of a prompt ("... It was") matters most to the answer.

Every batch holds ``input_ids``, ``attention_mask`` and ``labels`` (R, S), with labels
aligned to input_ids (not shifted: the loss shifts) and -100 wherever no loss applies.
Classification batches trained with MeZO's candidate loss have one row per
(example, candidate), example-major, plus ``num_candidates`` (E,) and ``gold`` (E,).
Only input_ids and attention_mask (and position_ids where present) go to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from distzo.tasks.base import KINDS, Example

IGNORE_INDEX = -100
Side = Literal["left", "right"]


@dataclass
class Row:
    ids: list[int]
    labels: list[int]


def collate_train(
    examples: Sequence[Example],
    tokenizer,
    kind: str,
    max_length: int,
    train_as_classification: bool = True,
) -> dict[str, torch.Tensor]:
    """A training batch for a task of ``kind``.

    Classification trains with the candidate loss by default; with
    ``train_as_classification=False`` it trains the LM loss on the gold answer alone.
    Generation and LM rows are one per example with labels on the target tokens.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    if kind == "classification" and train_as_classification:
        return collate_candidates(examples, tokenizer, max_length)
    if kind == "classification":
        targets = [_gold_answer(e) for e in examples]
    else:
        targets = [_target(e) for e in examples]
    prompts = _tokenize(tokenizer, [e.prompt for e in examples])
    bos = bos_ids(tokenizer)
    rows = [_row(bos, p, t, max_length, truncate_target=True) for p, t in zip(prompts, _tokenize(tokenizer, targets))]
    return pad_rows(rows, pad_id(tokenizer), "right")


def collate_candidates(
    examples: Sequence[Example], tokenizer, max_length: int, padding_side: Side = "right"
) -> dict[str, torch.Tensor]:
    """One row per (example, candidate) with labels on the candidate's tokens.

    Evaluation pads on the left so that every row's candidate ends at the last position
    and the model need only produce logits for the last few positions.
    """
    for e in examples:
        if not e.candidates:
            raise ValueError(f"example has no candidates to score: {e.prompt[:80]!r}")
    prompts = _tokenize(tokenizer, [e.prompt for e in examples])
    flat = _tokenize(tokenizer, [c for e in examples for c in e.candidates])
    bos = bos_ids(tokenizer)
    rows, start = [], 0
    for e, prompt in zip(examples, prompts):
        for text, cand in zip(e.candidates, flat[start : start + len(e.candidates)]):
            if not cand:
                raise ValueError(f"candidate {text!r} tokenises to nothing")
            rows.append(_row(bos, prompt, cand, max_length, truncate_target=False))
        start += len(e.candidates)
    batch = pad_rows(rows, pad_id(tokenizer), padding_side)
    batch["num_candidates"] = torch.tensor([len(e.candidates) for e in examples], dtype=torch.long)
    batch["gold"] = torch.tensor([IGNORE_INDEX if e.gold is None else e.gold for e in examples], dtype=torch.long)
    return batch


def collate_prompts(examples: Sequence[Example], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Prompts alone, left-padded and left-truncated to ``max_length``: the input of generation."""
    bos = bos_ids(tokenizer)
    prompts = _tokenize(tokenizer, [e.prompt for e in examples])
    rows = [_row(bos, p, [], max_length, truncate_target=True) for p in prompts]
    batch = pad_rows(rows, pad_id(tokenizer), "left")
    del batch["labels"]
    return batch


def _row(bos: list[int], prompt: list[int], target: list[int], max_length: int, truncate_target: bool) -> Row:
    room = max_length - len(bos)
    if len(target) > room:
        if not truncate_target:
            raise ValueError(f"an answer of {len(target)} tokens does not fit in max_length={max_length}")
        target = target[:room]
    keep = room - len(target)
    prompt = prompt[len(prompt) - keep :] if len(prompt) > keep else prompt
    ids = bos + prompt + target
    return Row(ids=ids, labels=[IGNORE_INDEX] * (len(ids) - len(target)) + target)


def pad_rows(rows: Sequence[Row], pad: int, side: Side) -> dict[str, torch.Tensor]:
    width = max((len(r.ids) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, len(r.ids)) if side == "right" else slice(width - len(r.ids), width)
        ids[i, span] = torch.tensor(r.ids, dtype=torch.long)
        labels[i, span] = torch.tensor(r.labels, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bos_ids(tokenizer) -> list[int]:
    """[bos] if the tokenizer puts a BOS token in front of text by default, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def pad_id(tokenizer) -> int:
    """The pad token, else EOS (masked out anyway), else 0."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    return 0


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _target(e: Example) -> str:
    if e.target is None:
        raise ValueError(f"example has no target to train on: {e.prompt[:80]!r}")
    return e.target


def _gold_answer(e: Example) -> str:
    if e.gold is None:
        raise ValueError(f"example has no gold candidate to train on: {e.prompt[:80]!r}")
    return e.candidates[e.gold]
