"""Conversations to token ids with the tokenizer's chat template, the loss on the assistant turns.

TRL's convention (``assistant_only_loss``): the loss covers each assistant turn's content and
the end-of-turn token that closes it; system and user turns, and the header the template
writes before each answer, are masked. Few templates mark their turns (``{% generation %}``,
which ``apply_chat_template(..., return_assistant_tokens_mask=True)`` needs; SmolLM2's does
not), so each assistant turn is found by rendering the conversation up to it: with the
generation prompt (all that comes before the answer) and through the turn. Both renderings
must begin the whole conversation's; a template that rewrites earlier turns is refused.

A turn's trained text ends at its first EOS. Where the template closes turns without EOS,
the tokenizer's EOS is inserted after the turn, trained, so a tuned model learns to stop.
Pieces are tokenised on their own and concatenated, as prompts and answers are in collate.
"""

from __future__ import annotations

from typing import Any, Sequence

Message = dict[str, Any]
Segment = tuple[list[int], bool]  # token ids, and whether the loss covers them


def chat_segments(messages: Sequence[Message], tokenizer, eos: int) -> list[Segment]:
    """The conversation as the chat template renders it, in masked and trained pieces."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model {model_name(tokenizer)!r} has no chat template, so it cannot be trained on "
                         "conversations (messages); give prompt/completion rows or a model with a chat template")
    full = _render(tokenizer, messages)
    pieces: list[tuple[str, bool]] = []  # text, and whether it is an assistant turn
    done = 0
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise ValueError(f"the chat template of {model_name(tokenizer)!r} does not render a conversation "
                             f"turn by turn (turn {i} changes what comes before it), so its answers cannot be found")
        pieces += [(full[done : len(before)], False), (through[len(before) :], True)]
        done = len(through)
    pieces.append((full[done:], False))
    ids = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
    segments: list[Segment] = []
    for piece, (_, answer) in zip(ids, pieces):
        segments += _closed(list(piece), eos) if answer else [(list(piece), False)]
    return segments


def _closed(turn: list[int], eos: int) -> list[Segment]:
    """An assistant turn trained up to and including its first EOS (inserted where it has none)."""
    if eos not in turn:
        return [(turn + [eos], True)]
    end = turn.index(eos) + 1
    return [(turn[:end], True), (turn[end:], False)]


def _render(tokenizer, messages: Sequence[Message], generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:  # the template's own raise_exception: roles out of order, say
        raise ValueError(f"the chat template of {model_name(tokenizer)!r} refuses a conversation: {err}") from None


def model_name(tokenizer) -> str:
    """The model a tokenizer was loaded from, for error messages."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
