"""Training tasks: one `TaskKind` per kind of label (`kinds/`), the registry that finds them,
and the kind-dispatched heads, losses and metrics the training loop uses.

Where to add a kind: a new module in `pipelines/tasks/kinds/` (see the README's development
section).
"""

from pipelines.tasks.contract import FittedTask, TaskKind, kind_names, kind_of, register
from pipelines.tasks.heads import TaskMetrics, task_heads, task_loss

__all__ = [
    "FittedTask",
    "TaskKind",
    "TaskMetrics",
    "kind_names",
    "kind_of",
    "register",
    "task_heads",
    "task_loss",
]
