"""prodvec on Airflow: one SparkSubmitOperator per stage, chained in data-flow order.

Two DAGs:
- `prodvec_daily` (every day): clean the day's catalog, then embed. The embed stage sees the
  model the table already holds, so it embeds only new and changed products (incremental);
  then the faiss index of the new table version is built and the version evaluated (probes,
  drift against yesterday's version).
- `prodvec_weekly_retrain` (every week): the whole pipeline, word2vec and training included;
  the new registered model makes the embed a full refresh.

Every task is `spark-submit local:///opt/prodvec/jobs/<stage>.py --conf cluster --conf
<catalog>` against a Kubernetes master with the job image (deploy/docker: the wheel is
installed there, so no --py-files), so the scheduler needs only the
apache-airflow-providers-apache-spark package and a Spark connection (`spark_prodvec`:
host k8s://<api server>, extra {"deploy-mode": "cluster"}, image and namespace in its conf). Retries are safe: a stage
writes its outputs whole or not at all, training resumes from its last checkpoint, and the
embed commit is idempotent per `embed.app_id` (one id per DAG run and catalog).

Secrets never appear here: the MLflow token and storage credentials come from the
environment of the workers (Kubernetes Secrets or the Airflow secrets backend), and
`MLFLOW_TRACKING_URI`, `PRODVEC_WORKDIR` and `PRODVEC_DATA` from the Airflow Variables
`prodvec_mlflow_uri`, `prodvec_workdir` and `prodvec_data`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import pairwise

from airflow import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

CATALOG = "flipkart"  # the conf/<name>.yaml overlay of the catalog these DAGs keep embedded
JOBS = "local:///opt/prodvec/jobs"  # jobs/ inside the job image
CONNECTION = "spark_prodvec"
IMAGE = "registry.example.com/prodvec:0.1.0"  # deploy/docker/Dockerfile
GPU_IMAGE = "registry.example.com/prodvec:0.1.0-gpu"  # deploy/docker/Dockerfile.gpu

# Stages in data-flow order; each task runs after the one before it. `evaluate` ends both:
# its drift report against the previous table version is what downstream teams read first.
DAILY_STAGES = ("clean", "embed", "index", "evaluate")
WEEKLY_STAGES = ("clean", "corpus", "shard", "train", "embed", "index", "evaluate")
SCHEDULES = {"prodvec_daily": "@daily", "prodvec_weekly_retrain": "@weekly"}

# Spark settings per stage on top of the cluster's defaults: the GPU stages ask for one GPU
# per executor and per task (train: one DDP process per GPU; embed: one model copy per GPU).
GPU = {
    "spark.kubernetes.container.image": GPU_IMAGE,
    "spark.executor.resource.gpu.amount": "1",
    "spark.task.resource.gpu.amount": "1",
    "spark.executor.resource.gpu.vendor": "nvidia.com",
    "spark.executor.resource.gpu.discoveryScript": "/opt/prodvec/bin/gpu-discovery.sh",
}
SPARK_CONF = {
    "corpus": {"spark.driver.memory": "8g", "spark.driver.cores": "8"},  # word2vec runs there
    "train": {**GPU, "spark.executor.instances": "4", "spark.executor.memory": "32g"},
    "embed": {**GPU, "spark.executor.instances": "4", "spark.executor.memory": "16g"},
}
STAGE_ARGUMENTS = {
    "train": ["train.num_processes=4", "train.device=cuda"],  # 4 executors x 1 GPU
    "embed": ["embed.app_id=prodvec-{{ dag.dag_id }}-{{ ds }}-" + CATALOG],
}

DEFAULT_ARGS = {
    "owner": "prodvec",
    "retries": 2,
    "retry_delay": timedelta(minutes=10),
    "retry_exponential_backoff": True,
}


def submit(stage: str) -> SparkSubmitOperator:
    """One stage as a scheduler runs it: the job script, the cluster overlay, the catalog."""
    return SparkSubmitOperator(
        task_id=stage,
        conn_id=CONNECTION,
        application=f"{JOBS}/{stage}.py",
        name=f"prodvec-{stage}-{CATALOG}",
        conf={"spark.kubernetes.container.image": IMAGE, **SPARK_CONF.get(stage, {})},
        env_vars={
            "MLFLOW_TRACKING_URI": "{{ var.value.prodvec_mlflow_uri }}",
            "PRODVEC_WORKDIR": "{{ var.value.prodvec_workdir }}",  # e.g. s3a://.../prodvec
            "PRODVEC_DATA": "{{ var.value.prodvec_data }}",
        },  # the raw catalogs
        application_args=["--conf", "cluster", "--conf", CATALOG, *STAGE_ARGUMENTS.get(stage, [])],
    )


def build(dag_id: str, stages: tuple[str, ...]) -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=SCHEDULES[dag_id],
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        tags=["prodvec"],
    ) as dag:
        tasks = [submit(stage) for stage in stages]
        for upstream, downstream in pairwise(tasks):
            upstream >> downstream
    return dag


daily = build("prodvec_daily", DAILY_STAGES)
weekly = build("prodvec_weekly_retrain", WEEKLY_STAGES)
