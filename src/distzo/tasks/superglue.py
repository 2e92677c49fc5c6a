"""SST-2 and the SuperGLUE classification tasks with MeZO's prompts and verbalisers.

MeZO (Malladi et al., 2023) scores each candidate by the log-likelihood of its tokens after
the prompt. Most prompts come from PromptSource and end in a newline, so their answers
("Yes", "No", ...) carry no leading space; SST-2's " great" follows "It was" and does.
Labels follow the hub datasets: ``candidates[label]`` is the gold answer.
"""

from __future__ import annotations

from typing import Any

from distzo.tasks.base import Example, TaskConfig
from distzo.tasks.hub import HubTask, Record, TemplateTask


class SST2(TemplateTask):
    name = "sst2"
    hub_path, hub_name = "nyu-mll/glue", "sst2"
    template = "{sentence} It was"
    verbalizer = (" terrible", " great")

    def fields(self, record: Record) -> dict[str, Any]:
        return {**record, "sentence": record["sentence"].strip()}


class RTE(TemplateTask):
    name = "rte"
    hub_path, hub_name = "aps/super_glue", "rte"
    template = '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'
    verbalizer = ("Yes", "No")  # 0 = entailment


class CB(TemplateTask):
    name = "cb"
    hub_path, hub_name = "aps/super_glue", "cb"
    template = 'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'
    verbalizer = ("Yes", "No", "Maybe")  # entailment, contradiction, neutral


class BoolQ(TemplateTask):
    name = "boolq"
    hub_path, hub_name = "aps/super_glue", "boolq"
    template = "{passage} {question}?"
    verbalizer = (" No", " Yes")  # 1 = true


class WIC(TemplateTask):
    name = "wic"
    hub_path, hub_name = "aps/super_glue", "wic"
    template = (
        'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n'
    )
    verbalizer = ("No", "Yes")


class WSC(TemplateTask):
    name = "wsc"
    hub_path, hub_name = "aps/super_glue", "wsc.fixed"
    template = '{text}\nIn the previous sentence, does the pronoun "{span2_text}" refer to {span1_text}? Yes or No?\n'
    verbalizer = ("No", "Yes")

    def fields(self, record: Record) -> dict[str, Any]:
        return {**record, "span2_text": record["span2_text"].lower()}


class MultiRC(TemplateTask):
    name = "multirc"
    hub_path, hub_name = "aps/super_glue", "multirc"
    template = '{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n'
    verbalizer = ("No", "Yes")


class COPA(HubTask):
    """The premise is continued by each alternative, joined by " so" (effect) or " because" (cause).

    MeZO drops the premise's final period and lower-cases the alternative's first word
    (except "I"), so each candidate reads as the end of one sentence.
    """

    name = "copa"
    kind = "classification"
    hub_path, hub_name = "aps/super_glue", "copa"
    connectors = {"effect": " so", "cause": " because"}

    def convert(self, record: Record, cfg: TaskConfig) -> Example | None:
        label = record.get("label")
        if label not in (0, 1):
            return None
        premise = record["premise"].rstrip()
        premise = premise[:-1] if premise.endswith(".") else premise
        prompt = premise + self.connectors[record["question"]]
        candidates = [" " + _lower_first_word(record[key]) for key in ("choice1", "choice2")]
        return Example(prompt=prompt, candidates=candidates, gold=int(label))


def _lower_first_word(text: str) -> str:
    first, _, rest = text.partition(" ")
    first = first if first == "I" else first.lower()
    return f"{first} {rest}" if rest else first


class ReCoRD(HubTask):
    """Cloze over the passage's entities, in MeZO's GPT-3 style.

    The prompt is the passage with its highlights as "- " bullets, ending in a new bullet;
    each candidate is the query with one entity in place of "@placeholder". The gold is the
    first answer entity (the answers are surface forms of one entity).
    """

    name = "record"
    kind = "classification"
    hub_path, hub_name = "aps/super_glue", "record"

    def convert(self, record: Record, cfg: TaskConfig) -> Example | None:
        entities = list(dict.fromkeys(record["entities"]))  # unique, in passage order
        answers = [a for a in record["answers"] if a in entities]
        if not answers:
            return None
        query = record["query"].replace("@highlight\n", "- ")
        prompt = record["passage"].replace("@highlight\n", "- ") + "\n-"
        candidates = [" " + query.replace("@placeholder", entity) for entity in entities]
        return Example(prompt=prompt, candidates=candidates, gold=entities.index(answers[0]))
