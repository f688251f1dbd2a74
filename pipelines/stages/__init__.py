"""The stages, one module per Spark job, and the registry that runs them (`registry`).

Where to add a stage: a module here with `run(spark, config) -> StageResult`, and its entry in
`registry.STAGES`.
"""

from pipelines.stages.registry import (
    STAGES,
    Stage,
    get_stage,
    run_pipeline,
    run_stage,
    summary,
)

__all__ = ["STAGES", "Stage", "get_stage", "run_pipeline", "run_stage", "summary"]
