"""MeZO's task suite, Rotten Tomatoes offline, JSONL SFT and plain-text LM, as ``Example`` lists.

    from distzo.tasks import TaskConfig, get_task, collate_train
    cfg = TaskConfig(name="rotten_tomatoes", num_train=1000)
    data = get_task(cfg.name).load(cfg)
    batch = collate_train(data.train[:16], tokenizer, "classification", max_length=cfg.max_length)
"""

from distzo.tasks.base import KINDS, Example, Kind, Task, TaskConfig, TaskData
from distzo.tasks.collate import collate_candidates, collate_train
from distzo.tasks.registry import TASKS, get_task


def load_task(cfg: TaskConfig) -> TaskData:
    """The splits of the task ``cfg`` names."""
    return get_task(cfg.name).load(cfg)


__all__ = [
    "KINDS",
    "TASKS",
    "Example",
    "Kind",
    "Task",
    "TaskConfig",
    "TaskData",
    "collate_candidates",
    "collate_train",
    "get_task",
    "load_task",
]
