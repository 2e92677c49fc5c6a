"""Every task by name."""

from __future__ import annotations

from distzo.tasks.base import Task
from distzo.tasks.custom import SFT, Classification
from distzo.tasks.debates import Debates
from distzo.tasks.local import JsonlSFT, PlainText
from distzo.tasks.qa import DROP, SQuAD
from distzo.tasks.rotten_tomatoes import RottenTomatoes
from distzo.tasks.superglue import CB, COPA, RTE, SST2, WIC, WSC, BoolQ, MultiRC, ReCoRD

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        SST2(), RTE(), CB(), BoolQ(), WSC(), WIC(), MultiRC(), COPA(), ReCoRD(),
        SQuAD(), DROP(), RottenTomatoes(), JsonlSFT(), PlainText(), SFT(), Classification(), Debates(),
    )
}  # fmt: skip


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
