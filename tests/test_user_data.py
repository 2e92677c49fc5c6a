"""Data of one's own: conversations rendered with the chat template, prompt/completion rows with EOS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distzo.losses import IGNORE_INDEX
from distzo.tasks import Example, TaskConfig, collate_train, load_task

CHAT = [
    {"role": "system", "content": "the plot"},
    {"role": "user", "content": "the movie"},
    {"role": "assistant", "content": "was good"},
    {"role": "user", "content": "a film"},
    {"role": "assistant", "content": "is very bad"},
]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model_dir)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained(batch, row: int = 0) -> list[int]:
    labels = batch["labels"][row]
    return labels[labels != IGNORE_INDEX].tolist()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------- chat rows


def test_chat_row_masks_all_but_the_assistant_turns_and_their_eos(chat_tokenizer):
    tok = chat_tokenizer
    eos = tok.eos_token_id
    batch = collate_train([Example(messages=CHAT)], tok, "lm", max_length=64)
    # Built by hand from the template "<role> : <content> </s>" and the generation prompt "assistant :".
    masked = [ids(tok, "system : the plot") + [eos] + ids(tok, "user : the movie") + [eos] + ids(tok, "assistant :"),
              ids(tok, "user : a film") + [eos] + ids(tok, "assistant :")]
    answers = [ids(tok, "was good") + [eos], ids(tok, "is very bad") + [eos]]
    expected_ids = masked[0] + answers[0] + masked[1] + answers[1]
    expected_labels = [IGNORE_INDEX] * len(masked[0]) + answers[0] + [IGNORE_INDEX] * len(masked[1]) + answers[1]
    assert batch["input_ids"][0].tolist() == expected_ids
    assert batch["labels"][0].tolist() == expected_labels
    assert trained(batch).count(eos) == 2  # each answer is trained to stop
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert ids(tok, full) == expected_ids  # the pieces tokenise as the whole conversation does


def test_chat_template_without_eos_gets_one_after_each_answer(tiny_chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")  # fmt: skip
    batch = collate_train([Example(messages=CHAT[1:3])], tok, "lm", max_length=64)
    eos = tok.eos_token_id
    assert batch["input_ids"][0].tolist() == ids(tok, "user : the movie assistant : was good") + [eos]
    assert trained(batch) == ids(tok, "was good") + [eos]


def test_chat_row_is_cut_from_the_end(chat_tokenizer):
    full = collate_train([Example(messages=CHAT)], chat_tokenizer, "lm", max_length=64)
    cut = collate_train([Example(messages=CHAT)], chat_tokenizer, "lm", max_length=10)
    assert cut["input_ids"][0].tolist() == full["input_ids"][0, :10].tolist()
    assert cut["labels"][0].tolist() == full["labels"][0, :10].tolist()


def test_tokenizer_without_chat_template_names_the_model(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=f"model '{tiny_model_dir}' has no chat template"):
        collate_train([Example(messages=CHAT)], tok, "lm", max_length=64)


def test_prompt_completion_rows_end_with_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [{"prompt": "the movie", "completion": " was very good"} for _ in range(10)]
    jsonl = load_task(TaskConfig(name="jsonl", data_path=str(write_jsonl(tmp_path / "a.jsonl", pairs)))).train
    batch = collate_train(jsonl[:2], tok, "lm", max_length=32)
    answer = ids(tok, " was very good") + [tok.eos_token_id]
    assert trained(batch, 0) == trained(batch, 1) == answer
    assert batch["input_ids"][0].tolist() == ids(tok, "the movie") + answer


# --------------------------------------------------------------------------- the packaged model's template


@pytest.mark.slow
def test_packaged_smollm2_chat_template_masks_the_answer_and_im_end(packaged_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(packaged_model_dir)
    turns = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "The capital of France is Paris."}]  # fmt: skip
    batch = collate_train([Example(messages=turns)], tok, "lm", max_length=256)
    rendered = tok.apply_chat_template(turns, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n")
    assert batch["input_ids"][0].tolist() == ids(tok, rendered)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trained(batch) == ids(tok, "The capital of France is Paris.") + [im_end]
    labels = batch["labels"][0].tolist()
    start = labels.index(trained(batch)[0])
    assert all(label == IGNORE_INDEX for label in labels[:start] + labels[start + len(trained(batch)) :])
