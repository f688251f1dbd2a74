"""Task failures: the row-batch context our executor-side Python attaches to an error, and a
fault-injection hook for the reliability tests.

Executor-side Python (mapInArrow steps) fails on the driver as a Spark exception whose
message is the worker's whole traceback wrapped in JVM stack frames. `named_batches` re-raises
any exception of one batch as a `TaskError` whose message names the stage, the partition, the
attempt and the row batch; `task_error` finds that one line in whatever the driver caught, so
the CLI prints it instead of the traceback wall.

Fault injection is off by default and meant for tests and failure drills only:
`PRODVEC_INJECT_FAULT="<stage>:<mode>[,<stage>:<mode>]"`, mode `fail` (the first attempt of
partition 0 raises `InjectedFault`, so Spark must retry the task: it needs
spark.task.maxFailures > 1, e.g. master `local[2,2]`), `hang-commit` (the driver stops once
every data file is written and before the commit, so a test can kill the job at that point)
or `pause-commit` (the driver waits at that point until the file named by
`PRODVEC_FAULT_RELEASE` exists, so a test can commit another run in between: a race on cue).
The driver reads the variable when the stage plans its job; unset, `inject` returns the frame
untouched and `commit_hook` returns None.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import DataFrame

from pipelines.core.errors import InjectedFault, ProdvecError, TaskError
from pipelines.core.workers import settle

__all__ = [
    "FAULT_VARIABLE",
    "RELEASE_VARIABLE",
    "commit_hook",
    "inject",
    "injected_mode",
    "named_batches",
    "task_error",
]

FAULT_VARIABLE = "PRODVEC_INJECT_FAULT"
RELEASE_VARIABLE = "PRODVEC_FAULT_RELEASE"
_MODES = ("fail", "hang-commit", "pause-commit")
_TASK_ERROR_LINE = re.compile(r"pipelines\.core\.errors\.TaskError: (.+)")


def _describe(stage: str, number: int, batch: pa.RecordBatch) -> str:
    context = TaskContext.get()
    where = (
        f"partition {context.partitionId()} (attempt {context.attemptNumber()})"
        if context is not None
        else "the driver"
    )
    ids = ""
    if "product_id" in batch.schema.names and batch.num_rows:
        column = batch.column("product_id")
        ids = f", product_id {column[0].as_py()!r}..{column[-1].as_py()!r}"
    return f"stage {stage}, {where}, row batch {number} ({batch.num_rows} rows{ids})"


def named_batches(
    stage: str, batches: Iterator[pa.RecordBatch], step: Callable[[pa.RecordBatch], pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    """Apply `step` to each batch; any failure becomes a one-line TaskError naming the batch.
    After the first batch (the step has loaded its model) the worker is `settle`d."""
    for number, batch in enumerate(batches):
        try:
            out = step(batch)
        except Exception as err:
            message = " ".join(str(err).split())
            raise TaskError(
                f"{_describe(stage, number, batch)}: {type(err).__name__}: {message}"
            ) from err
        if number == 0:
            settle()
        yield out


def task_error(err: BaseException) -> TaskError | None:
    """The TaskError an executor raised, recovered from the driver-side Spark exception."""
    if isinstance(err, TaskError):
        return err
    lines = _TASK_ERROR_LINE.findall(str(err))
    return TaskError(lines[-1].strip()) if lines else None


def injected_mode(stage: str) -> str | None:
    """The fault mode PRODVEC_INJECT_FAULT asks of `stage`, or None (the default)."""
    for item in filter(None, os.environ.get(FAULT_VARIABLE, "").split(",")):
        name, _, mode = item.strip().partition(":")
        if mode not in _MODES:
            raise ProdvecError(
                f"{FAULT_VARIABLE}: {item!r} is not <stage>:<mode>, mode one of {', '.join(_MODES)}"
            )
        if name == stage:
            return mode
    return None


def inject(frame: DataFrame, stage: str) -> DataFrame:
    """`frame` as is, or, when PRODVEC_INJECT_FAULT asks `stage` to fail, behind an identity
    step whose first attempt at partition 0 raises."""
    if injected_mode(stage) != "fail":
        return frame

    def fail_first_attempt(batch: pa.RecordBatch) -> pa.RecordBatch:
        context = TaskContext.get()
        if context is not None and context.partitionId() == 0 and context.attemptNumber() == 0:
            print(f"prodvec: injected fail in stage {stage}", file=sys.stderr, flush=True)
            raise InjectedFault(f"injected failure in stage {stage} (first attempt)")
        return batch

    return frame.mapInArrow(
        lambda batches: named_batches(stage, batches, fail_first_attempt), frame.schema
    )


def commit_hook(stage: str) -> Callable[[list[str]], None] | None:
    """None, or, when PRODVEC_INJECT_FAULT asks `stage` to hang-commit or pause-commit, a hook
    that stops the driver between writing the files and committing them: until the process is
    killed, or until the PRODVEC_FAULT_RELEASE file exists."""
    mode = injected_mode(stage)
    if mode not in ("hang-commit", "pause-commit"):
        return None
    release = os.environ.get(RELEASE_VARIABLE, "") if mode == "pause-commit" else ""
    if mode == "pause-commit" and not release:
        raise ProdvecError(f"{FAULT_VARIABLE} {stage}:pause-commit needs {RELEASE_VARIABLE}")

    def stall(files: list[str]) -> None:
        print(
            f"prodvec: injected {mode} in stage {stage}: {len(files)} files written",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline and not (release and os.path.exists(release)):
            time.sleep(0.2)

    return stall
