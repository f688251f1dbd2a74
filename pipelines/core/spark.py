"""The one SparkSession factory.

Locally it builds a fast, quiet session (local master, small shuffle, Arrow on,
workers on this interpreter). Under `spark-submit` the submit settings own the
cluster: the factory only fills SQL settings the user did not set.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from pipelines.core.config import SparkConfig

__all__ = ["get_spark", "under_spark_submit"]

log = logging.getLogger(__name__)

_LOG4J = Path(__file__).resolve().parents[2] / "conf" / "log4j2.properties"
JAVA_OPTIONS = "spark.driver.extraJavaOptions"


def under_spark_submit() -> bool:
    """spark-submit starts the Python driver from the JVM and hands it a gateway port."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _session_defaults(config: SparkConfig) -> dict[str, str]:
    return {
        "spark.sql.shuffle.partitions": str(config.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        # With pruning on, CSV rows with too many fields are not flagged as corrupt.
        "spark.sql.csv.parser.columnPruning.enabled": "false",
        **config.conf,
    }


def get_spark(config: SparkConfig) -> SparkSession:
    """Return the active session, or build one with prodvec's local defaults."""
    active = SparkSession.getActiveSession()
    if active is not None or under_spark_submit():
        spark = active or SparkSession.builder.appName(config.app_name).getOrCreate()
        for key, value in _session_defaults(config).items():
            if key in config.conf or spark.conf.get(key, None) in (None, ""):
                spark.conf.set(key, value)
        return spark

    # Workers must run this interpreter (it has pyarrow); loopback avoids the
    # "resolves to a loopback address" warning on laptops.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (
        SparkSession.builder.master(config.master)
        .appName(config.app_name)
        .config("spark.driver.memory", config.driver_memory)
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.warehouse.dir", str(Path.cwd() / "work" / "spark-warehouse"))
    )
    # The quiet log4j2 file rides beside any JVM options of the user's (spark.conf).
    java_options = [config.conf.get(JAVA_OPTIONS, "")]
    if _LOG4J.is_file():
        java_options.insert(0, f"-Dlog4j2.configurationFile=file:{_LOG4J}")
    builder = builder.config(JAVA_OPTIONS, " ".join(filter(None, java_options)))
    for key, value in _session_defaults(config).items():
        if key != JAVA_OPTIONS:
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    log.info("Spark %s session on %s", spark.version, spark.sparkContext.master)
    return spark
