"""Data of one's own: chat and prompt/completion SFT, classification over user columns and label
words, plain text over a column; datasets by path in the hub's layouts; one-line errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from distzo.cli import main
from distzo.losses import IGNORE_INDEX
from distzo.tasks import Example, TaskConfig, collate_train, get_task, load_task

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


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def reviews(n: int, labels=("bad", "good")) -> list[dict]:
    """Reviews in the tiny vocabulary; the label is the review's last word."""
    words = ["the movie was", "a film is", "the plot is", "the acting was"]
    return [{"review": f"{words[i % 4]} very {labels[i % 2]}", "sentiment": labels[i % 2], "idx": i} for i in range(n)]


def train_args(model_dir, out: Path, *task_args: str) -> list[str]:
    return ["train", "--lora", "false", "--model", str(model_dir), "--output-dir", str(out), *task_args,
            "--task.num_train", "16", "--task.num_dev", "4", "--task.num_test", "8", "--batch-size", "4",
            "--steps", "2", "--lr", "1e-2", "--eps", "1e-2", "--progress", "false", "--tensorboard", "false",
            "--zero_shot", "false"]  # fmt: skip


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


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
    sft = load_task(TaskConfig(name="sft", data_path=str(write_csv(tmp_path / "a.csv", pairs)))).train
    for examples in (jsonl, sft):
        batch = collate_train(examples[:2], tok, "lm", max_length=32)
        answer = ids(tok, " was very good") + [tok.eos_token_id]
        assert trained(batch, 0) == trained(batch, 1) == answer
        assert batch["input_ids"][0].tolist() == ids(tok, "the movie") + answer


def test_chat_jsonl_trains_and_reports_the_loss(tiny_chat_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 30)
    out = tmp_path / "run"
    assert main(train_args(tiny_chat_model_dir, out, "--task", "sft", "--data", str(data))) == 0
    assert results(out)["final"]["loss"] > 0 and results(out)["test_examples"] == 8
    assert get_task("sft").kind == "lm"


def test_sft_pairs_from_named_columns_train(tiny_model_dir, tmp_path):
    rows = [{"question": "the movie", "answer": " was good"}] * 30
    data = write_csv(tmp_path / "pairs.csv", rows)
    out = tmp_path / "run"
    argv = train_args(tiny_model_dir, out, "--task", "sft", "--dataset", str(data),
                      "--prompt-column", "question", "--completion-column", "answer")  # fmt: skip
    assert main(argv) == 0
    assert results(out)["final"]["loss"] > 0


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("labels", ["strings", "ints", "label_values"])
def test_csv_classification_with_user_columns_trains(tiny_model_dir, tmp_path, labels):
    names = ("neg", "pos") if labels == "label_values" else ("bad", "good")
    rows = reviews(40, names)
    if labels == "ints":
        rows = [{**r, "sentiment": int(r["sentiment"] == "good")} for r in rows]
    data = write_csv(tmp_path / "reviews.csv", rows)
    out = tmp_path / "run"
    extra = ["--label-values", "neg,pos"] if labels == "label_values" else []
    argv = train_args(tiny_model_dir, out, "--task", "classification", "--dataset", str(data),
                      "--text-column", "review", "--label-column", "sentiment", "--labels", "bad,good",
                      "--template", "{review} . it was", *extra)  # fmt: skip
    assert main(argv) == 0
    assert 0 <= results(out)["final"]["accuracy"] <= 1
    test = load_task(TaskConfig(name="classification", dataset=str(data), text_column="review",
                                label_column="sentiment", labels=["bad", "good"],
                                label_values=["neg", "pos"] if labels == "label_values" else []))
    for e in test.train + test.dev + test.test:  # the default template; gold follows the review's last word
        assert e.candidates == [" bad", " good"] and e.prompt.endswith(f"very {names[e.gold]}\nLabel:")


def test_eval_takes_the_same_dataset_settings_as_train(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "reviews.csv", reviews(40))
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "classification", "--dataset", str(data),
            "--text-column", "review", "--label-column", "sentiment", "--labels", "bad,good", "--num-examples", "8"]
    assert main(argv) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["task"] == "classification" and scored["examples"] == 8 and 0 <= scored["accuracy"] <= 1


# --------------------------------------------------------------------------- datasets by path


def hub_clone(root: Path) -> Path:
    """A local copy of a hub dataset repository: per-configuration Parquet folders and a README
    whose YAML header names the configurations and their splits, as on the hub."""
    import datasets

    configs = {"reviews": ("train", "validation", "test"), "short": ("train",)}
    header = ["---", "configs:"]
    for config, splits in configs.items():
        header += [f"- config_name: {config}", "  data_files:"]
        for split in splits:
            n = 30 if split == "train" else 6
            rows = [{"text": f"{config} {split} {i}", "label": i % 2} for i in range(n)]
            (root / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
            header += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join(header + ["---", ""]))
    return root


def split_of(e: Example) -> str:
    return e.prompt.split()[1]


def test_hub_layout_parquet_with_configurations_and_splits(tmp_path):
    root = str(hub_clone(tmp_path / "hub"))
    base = dict(name="classification", dataset=root, labels=["no", "yes"], num_train=10, num_dev=4, num_test=5)
    data = load_task(TaskConfig(**base, dataset_config="reviews"))
    assert [len(data.train), len(data.dev), len(data.test)] == [10, 4, 5]
    assert {split_of(e) for e in data.train} == {"train"} and {split_of(e) for e in data.dev} == {"validation"}
    assert {split_of(e) for e in data.test} == {"test"}
    assert all(e.gold == int(e.prompt.split()[2]) % 2 for e in data.train)
    # test from validation: dev, with no split left to it, is carved out of train
    data = load_task(TaskConfig(**base, dataset_config="reviews", test_split="validation"))
    assert {split_of(e) for e in data.dev} == {"train"} and {split_of(e) for e in data.test} == {"validation"}
    assert not {e.prompt for e in data.dev} & {e.prompt for e in data.train}
    short = load_task(TaskConfig(**base, dataset_config="short"))
    assert all(e.prompt.startswith("short train") for e in short.train + short.dev + short.test)


def test_saved_dataset_dict_and_json_folder_with_split_names(tmp_path):
    import datasets

    splits = {name: [{"messages": [{"role": "user", "content": f"{name} {i}"}, {"role": "assistant", "content": "ok"}]}
                     for i in range(8)] for name in ("training", "dev", "heldout")}  # fmt: skip
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(tmp_path / "saved")
    folder = tmp_path / "json"
    folder.mkdir()
    for name, file in (("training", "train.json"), ("dev", "validation.json"), ("heldout", "test.json")):
        (folder / file).write_text(json.dumps(splits[name]))
    names = dict(train_split="training", dev_split="dev", test_split="heldout")
    for source, split_names in ((tmp_path / "saved", names), (folder, {})):
        data = load_task(TaskConfig(name="sft", dataset=str(source), num_train=5, num_dev=3, num_test=4, **split_names))
        assert [len(data.train), len(data.dev), len(data.test)] == [5, 3, 4]
        for examples, split in ((data.train, "training"), (data.dev, "dev"), (data.test, "heldout")):
            assert {e.messages[0]["content"].split()[0] for e in examples} == {split}
    with pytest.raises(ValueError, match="has no configuration 'x'"):
        load_task(TaskConfig(name="sft", dataset=str(tmp_path / "saved"), dataset_config="x", **names))


def test_single_split_is_carved_disjointly_and_deterministically(tmp_path):
    data = str(write_csv(tmp_path / "all.csv", reviews(50)))

    def carve(seed: int):
        cfg = TaskConfig(name="classification", dataset=data, text_column="review", label_column="sentiment",
                         labels=["bad", "good"], template="{idx}: {review}", num_train=20, num_dev=5, num_test=10,
                         seed=seed)  # fmt: skip
        return load_task(cfg)

    a, again, b = carve(0), carve(0), carve(1)
    assert [len(a.train), len(a.dev), len(a.test)] == [20, 5, 10]
    texts = [e.prompt for e in a.train + a.dev + a.test]
    assert len(set(texts)) == 35  # disjoint
    assert [e.prompt for e in again.train + again.dev + again.test] == texts
    assert [e.prompt for e in b.test] == [e.prompt for e in a.test]  # test does not move with the seed
    assert [e.prompt for e in b.train] != [e.prompt for e in a.train]


def test_text_task_over_a_dataset_column(tmp_path):
    docs = [{"body": " ".join(["the movie was good"] * 6) + f" doc{i}", "n": i} for i in range(12)]
    data = str(write_jsonl(tmp_path / "docs.jsonl", docs))
    cfg = TaskConfig(name="text", dataset=data, text_column="body", max_length=8, num_train=10, num_dev=2, num_test=3)
    split = load_task(cfg)
    assert [len(split.train), len(split.dev), len(split.test)] == [10, 2, 3]
    assert split.test[-1].target.endswith("doc11")  # carved from the end, in reading order
    assert all(e.prompt == "" and not e.eos for e in split.train)


# --------------------------------------------------------------------------- one-line errors


def fail(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what the test wrote while making its data
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distzo: error: ") and "\n" not in err, err
    return err


@pytest.fixture
def reviews_csv(tmp_path) -> str:
    return str(write_csv(tmp_path / "reviews.csv", reviews(20)))


CLASSIFY = ["--task", "classification", "--text-column", "review", "--label-column", "sentiment"]


@pytest.mark.parametrize("args,message", [
    (["--text-column", "body", "--labels", "bad,good"], r"has no column 'body' \(split 'train'\); its columns: review"),
    (["--labels", "bad,fine"], r"label 'good' in column 'sentiment' is not an index 0\.\.1 or one of the labels bad, fi"),
    (["--labels", "bad,good", "--label-values", "neg,pos"], r"label '(bad|good)' .* not one of label_values neg, pos"),
    (["--labels", "good"], r"needs labels: at least 2 label words"),
    (["--labels", "bad,good", "--template", "{body} was"], r"no column for the template placeholder 'body'"),
    (["--labels", "bad,good", "--template", "{idx} was"], r"does not use text_column 'review'"),
    (["--labels", "bad,good", "--test-split", "heldout"], r"has no split 'heldout' for test; its splits: train"),
    (["--labels", "bad,good", "--dataset-config", "x"], r"no configuration 'x'"),
])  # fmt: skip
def test_classification_errors_are_one_line(capsys, tiny_model_dir, tmp_path, reviews_csv, args, message):
    err = fail(capsys, train_args(tiny_model_dir, tmp_path / "o", *CLASSIFY, "--dataset", reviews_csv, *args))
    assert reviews_csv in err
    assert re.search(message, err), err


def test_empty_split_and_missing_data_are_one_line(capsys, tiny_model_dir, tmp_path):
    import datasets

    empty = tmp_path / "empty.csv"
    empty.write_text("review,sentiment\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    train = datasets.Dataset.from_list(reviews(8))
    train.to_parquet(str(folder / "train.parquet"))
    train.select([]).to_parquet(str(folder / "validation.parquet"))
    for source, split in ((empty, "train"), (folder, "validation")):
        args = [*CLASSIFY, "--labels", "bad,good", "--dataset", str(source)]
        err = fail(capsys, train_args(tiny_model_dir, tmp_path / "o", *args))
        assert f"split '{split}' of dataset '{source}' is empty" in err
    offline = ["--task", "sft", "--dataset", "nobody/no-such-dataset-xyz"]
    assert "no-such-dataset-xyz" in fail(capsys, train_args(tiny_model_dir, tmp_path / "o", *offline))
    assert "needs data" in fail(capsys, train_args(tiny_model_dir, tmp_path / "o", "--task", "sft"))
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"question": "a"}])
    err = fail(capsys, train_args(tiny_model_dir, tmp_path / "o", "--task", "sft", "--data", str(pairs)))
    assert "has no column 'prompt' (split 'train'); its columns: question" in err


def test_settings_a_task_does_not_read_are_refused(capsys, tiny_model_dir, tmp_path):
    err = fail(capsys, train_args(tiny_model_dir, tmp_path / "o", "--task", "sst2", "--labels", "a,b"))
    assert "task 'sst2' does not use task.labels (tasks that do: classification)" in err
    with pytest.raises(ValueError, match="text_column applies to a dataset"):
        load_task(TaskConfig(name="text", text_column="body"))


def test_chat_without_a_chat_template_is_one_line(capsys, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 30)
    err = fail(capsys, train_args(tiny_model_dir, tmp_path / "o", "--task", "sft", "--data", str(data)))
    assert f"model '{tiny_model_dir}' has no chat template" in err
    assert not (tmp_path / "o").exists()  # refused before the run folder is made


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
