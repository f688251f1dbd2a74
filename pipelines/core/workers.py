"""Upkeep of the executor-side Python workers that run our heavy steps.

pyspark's daemon runs a full `gc.collect()` after every task of a reused Python worker. Once
the worker has imported torch and MLflow (embed, image features) or scikit-learn (probes),
that collection walks several hundred thousand module-level objects: about 0.2 s a task, paid
again by every later task of the worker, whatever its size. `settle` moves what is loaded into
the permanent generation (`gc.freeze`) so those collections scan only each task's own objects.
"""

from __future__ import annotations

import gc

from pyspark import TaskContext

__all__ = ["settle"]


def settle() -> None:
    """In a Spark task, collect the garbage and freeze what is left (modules, models); on the
    driver or in an in-process run, do nothing. After the first call a call costs little: it
    scans only what arrived since."""
    if TaskContext.get() is None:
        return
    gc.collect()
    gc.freeze()
