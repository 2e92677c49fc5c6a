"""Examples to model batches.

Prompt and answer are tokenised separately and their ids concatenated, so the answer's
tokens are exactly its own tokenisation whatever precedes it (MeZO scores candidates
this way). The answer is never truncated; the prompt loses its beginning instead, since
the end of a prompt ("... It was") matters most to the answer.

An answer that should end the text (``Example.eos``) is followed by the tokenizer's EOS, in
the labels too. A conversation (``Example.messages``) is rendered by the tokenizer's chat
template (``distzo.tasks.chat``) with labels on its assistant turns, and cut at
``max_length`` from the end, as TRL cuts: its beginning (system prompt, first question)
frames the answers.

Every batch holds ``input_ids``, ``attention_mask`` and ``labels`` (R, S), with labels
aligned to input_ids (not shifted: the loss shifts) and IGNORE_INDEX wherever no loss applies.
Classification batches trained with MeZO's candidate loss have one row per
(example, candidate), example-major, plus ``num_candidates`` (E,) and ``gold`` (E,).

When every candidate is a single token the candidates share their prompt, and a
candidate's score is just the log-probability of its token at the prompt's last
position. ``collate_classification`` then builds one left-padded row per example, with
no labels but ``candidate_ids`` (E, C_max) (-1 past an example's candidates),
``position_ids`` and ``logits_to_keep=1``: C times fewer rows, and the vocabulary
projection runs on one position per row.

Only input_ids, attention_mask, position_ids and logits_to_keep go to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from distzo.losses import IGNORE_INDEX
from distzo.tasks.base import KINDS, Example
from distzo.tasks.chat import chat_segments, model_name

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
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor | int]:
    """A training batch for a task of ``kind``.

    Classification trains with the candidate loss by default (one row per example when
    every candidate is a single token, see ``collate_classification``); with
    ``train_as_classification=False`` it trains the LM loss on the gold answer alone.
    Generation and LM rows are one per example with labels on the target tokens (and the
    EOS after them where the example asks for it), or on a conversation's assistant turns.
    The width is padded up to a multiple of ``pad_to_multiple_of`` (``widen``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    if kind == "classification" and train_as_classification:
        batch = collate_classification(examples, tokenizer, max_length)
        side: Side = "left" if "logits_to_keep" in batch else "right"  # the prompt rows are left-padded
        return widen(batch, pad_to_multiple_of, pad_id(tokenizer), side)
    plain = iter(_target_rows([e for e in examples if not e.messages], tokenizer, kind, max_length))
    rows = [_chat_row(e.messages, tokenizer, max_length) if e.messages else next(plain) for e in examples]
    return widen(pad_rows(rows, pad_id(tokenizer), "right"), pad_to_multiple_of, pad_id(tokenizer), "right")


# What a padding column holds, per batch key: a pad token, masked out, no label, position 0
# (the position the prompt rows give their padding).
_PADDING = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}


def widen(batch: dict, multiple: int, pad: int, side: Side) -> dict:
    """``batch`` with padding columns on ``side`` up to a width that is a multiple of ``multiple``.

    Fewer distinct widths mean fewer CUDA graphs to capture (``optim.cuda_graphs``). The
    padding is masked and unlabelled, so the losses are those of the unpadded batch up to
    float rounding (the matrix products have other shapes), not bit for bit.
    """
    width = batch["input_ids"].shape[1]
    extra = -width % multiple
    if not extra:
        return batch
    out = dict(batch)
    for name, fill in _PADDING.items():
        if name in batch:
            t = batch[name]
            cols = torch.full((t.shape[0], extra), pad if fill is None else fill, dtype=t.dtype)
            out[name] = torch.cat((cols, t) if side == "left" else (t, cols), dim=1)
    return out


def _target_rows(examples: Sequence[Example], tokenizer, kind: str, max_length: int) -> list[Row]:
    if kind == "classification":
        targets = [_gold_answer(e) for e in examples]
    else:
        targets = [_target(e) for e in examples]
    prompts = _tokenize(tokenizer, [e.prompt for e in examples])
    ends = [[eos_id(tokenizer)] if e.eos else [] for e in examples]
    bos = bos_ids(tokenizer)
    return [
        _row(bos, p, t + end, max_length, truncate_target=True)
        for p, t, end in zip(prompts, _tokenize(tokenizer, targets), ends)
    ]


def _chat_row(messages: list[dict], tokenizer, max_length: int) -> Row:
    ids: list[int] = []
    labels: list[int] = []
    for piece, trained in chat_segments(messages, tokenizer, eos_id(tokenizer)):
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return Row(ids=ids[:max_length], labels=labels[:max_length])


def collate_classification(
    examples: Sequence[Example], tokenizer, max_length: int, fallback_side: Side = "right"
) -> dict[str, torch.Tensor | int]:
    """One left-padded prompt row per example when every candidate is a single token, else
    ``collate_candidates`` (padded on ``fallback_side``).

    The prompt is cut as a candidate row would cut it (room left for one answer token),
    so both formats score the candidates on the same context.
    """
    prompts, candidates = _tokenize_candidates(examples, tokenizer)
    bos = bos_ids(tokenizer)
    rows = _shared_prompt_rows(bos, prompts, candidates, max_length)
    if rows is None:
        return _candidate_batch(examples, prompts, candidates, bos, max_length, pad_id(tokenizer), fallback_side)
    batch: dict[str, torch.Tensor | int] = dict(pad_rows(rows, pad_id(tokenizer), "left"))
    del batch["labels"]
    # Positions count real tokens only, so a model with absolute positions sees the
    # prompt where it would be unpadded.
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    batch["logits_to_keep"] = 1
    batch["candidate_ids"] = _candidate_grid([[c[0] for c in cands] for cands in candidates])
    batch.update(_answer_keys(examples))
    return batch


def collate_candidates(
    examples: Sequence[Example], tokenizer, max_length: int, padding_side: Side = "right"
) -> dict[str, torch.Tensor]:
    """One row per (example, candidate) with labels on the candidate's tokens.

    Evaluation pads on the left so that every row's candidate ends at the last position
    and the model need only produce logits for the last few positions.
    """
    prompts, candidates = _tokenize_candidates(examples, tokenizer)
    bos = bos_ids(tokenizer)
    return _candidate_batch(examples, prompts, candidates, bos, max_length, pad_id(tokenizer), padding_side)


def _tokenize_candidates(examples: Sequence[Example], tokenizer) -> tuple[list[list[int]], list[list[list[int]]]]:
    """The prompts' ids and, per example, its candidates' ids, each text tokenised on its own."""
    for e in examples:
        if not e.candidates:
            raise ValueError(f"example has no candidates to score: {e.prompt[:80]!r}")
    prompts = _tokenize(tokenizer, [e.prompt for e in examples])
    flat = _tokenize(tokenizer, [c for e in examples for c in e.candidates])
    candidates, start = [], 0
    for e in examples:
        ids = flat[start : start + len(e.candidates)]
        for text, cand in zip(e.candidates, ids):
            if not cand:
                raise ValueError(f"candidate {text!r} tokenises to nothing")
        candidates.append(ids)
        start += len(e.candidates)
    return prompts, candidates


def _shared_prompt_rows(
    bos: list[int], prompts: list[list[int]], candidates: list[list[list[int]]], max_length: int
) -> list[Row] | None:
    """The prompt rows, or None where a candidate has several tokens or a row would be empty
    (nothing to predict the first token from: the candidate rows' own handling applies)."""
    if max_length <= len(bos) or any(len(c) != 1 for cands in candidates for c in cands):
        return None
    rows = [_row(bos, p, [], max_length - 1, truncate_target=True) for p in prompts]
    return rows if all(r.ids for r in rows) else None


def _candidate_batch(
    examples: Sequence[Example],
    prompts: list[list[int]],
    candidates: list[list[list[int]]],
    bos: list[int],
    max_length: int,
    pad: int,
    side: Side,
) -> dict[str, torch.Tensor]:
    rows = [
        _row(bos, prompt, cand, max_length, truncate_target=False)
        for prompt, cands in zip(prompts, candidates)
        for cand in cands
    ]
    batch = pad_rows(rows, pad, side)
    batch.update(_answer_keys(examples))
    return batch


def _answer_keys(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    return {
        "num_candidates": torch.tensor([len(e.candidates) for e in examples], dtype=torch.long),
        "gold": torch.tensor([IGNORE_INDEX if e.gold is None else e.gold for e in examples], dtype=torch.long),
    }


def _candidate_grid(ids: list[list[int]]) -> torch.Tensor:
    """(E, C_max) token ids, -1 past an example's candidates."""
    grid = torch.full((len(ids), max((len(row) for row in ids), default=0)), -1, dtype=torch.long)
    for i, row in enumerate(ids):
        grid[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return grid


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


def eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer of {model_name(tokenizer)!r} has no EOS token to end the answers with")
    return int(eos)


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
