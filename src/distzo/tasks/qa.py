"""SQuAD and DROP as generation tasks, with MeZO's prompts.

The model is trained on the first answer and scored by F1/EM against all of them. The
target ends in a newline, as in MeZO: the model learns to stop, and decoding cuts there.
"""

from __future__ import annotations

from typing import Any

from distzo.tasks.base import Example, TaskConfig, render
from distzo.tasks.hub import HubTask, Record


class QATask(HubTask):
    kind = "generation"
    supports_template = True
    template: str = ""

    def fields(self, record: Record) -> dict[str, Any]:
        return dict(record)

    def answers(self, record: Record) -> list[str]:
        raise NotImplementedError

    def convert(self, record: Record, cfg: TaskConfig) -> Example | None:
        answers = [a.strip() for a in self.answers(record) if a.strip()]
        if not answers:
            return None
        prompt = render(cfg.template or self.template, self.fields(record))
        return Example(prompt=prompt, target=f" {answers[0]}\n", answers=answers)


class SQuAD(QATask):
    name = "squad"
    hub_path, hub_name = "rajpurkar/squad", None
    template = "Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:"

    def fields(self, record: Record) -> dict[str, Any]:
        return {**record, "question": record["question"].strip()}

    def answers(self, record: Record) -> list[str]:
        return list(record["answers"]["text"])


class DROP(QATask):
    name = "drop"
    hub_path, hub_name = "ucinlp/drop", None
    template = "Passage: {passage}\nQuestion: {question}\nAnswer:"

    def fields(self, record: Record) -> dict[str, Any]:
        return {**record, "question": record["question"].strip()}

    def answers(self, record: Record) -> list[str]:
        return list(record["answers_spans"]["spans"])
