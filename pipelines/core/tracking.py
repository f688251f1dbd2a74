"""MLflow plumbing: where runs go, and one nested run per stage.

Default tracking is a sqlite database in the workdir with a local artifact folder
(the file store is deprecated); a cluster overlay points `tracking.uri` at a
tracking server and the server decides artifact storage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow

from pipelines.core.config import Config

__all__ = ["artifact_location", "configure", "flatten", "stage_run", "tracking_uri"]

log = logging.getLogger(__name__)


def tracking_uri(config: Config) -> str:
    return config.tracking.uri or f"sqlite:///{config.workdir / 'mlflow.db'}"


def artifact_location(config: Config) -> str | None:
    """Where a new experiment's artifacts go: `tracking.artifact_location`; with a local
    database (the default, or any sqlite URI) `<workdir>/mlartifacts`, never MLflow's
    `./mlruns` in the current directory; with a tracking server, the server decides."""
    if config.tracking.artifact_location:
        return config.tracking.artifact_location
    if config.tracking.uri is None or config.tracking.uri.startswith("sqlite:"):
        return (config.workdir / "mlartifacts").as_uri()
    return None


def configure(config: Config) -> str:
    """Point MLflow at this config's store and experiment; return the experiment id. The
    default sqlite store is created readable by its owner alone: it holds every run's params."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    if config.tracking.uri is None:
        os.close(os.open(config.workdir / "mlflow.db", os.O_CREAT | os.O_WRONLY, 0o600))
    mlflow.set_tracking_uri(tracking_uri(config))
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        experiment_id = mlflow.create_experiment(
            config.tracking.experiment, artifact_location=artifact_location(config)
        )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextmanager
def stage_run(config: Config, stage: str) -> Iterator[mlflow.ActiveRun]:
    """A run for one stage: nested under `prodvec run`'s parent when there is one.

    The resolved config is logged as params and as `config.yaml`, so every stage's
    run says exactly what it ran with (secrets masked).
    """
    configure(config)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=stage, nested=nested) as run:
        mlflow.set_tags(
            {
                "prodvec.stage": stage,
                "prodvec.catalog": config.catalog.name,
                "prodvec.config_hash": config.digest(),
            }
        )
        params = flatten(config.redacted())
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_text(config.to_yaml(), "config.yaml")
        yield run
