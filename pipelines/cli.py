"""`prodvec` command line: `prodvec run` for the whole pipeline, `prodvec <stage>` for one.

    prodvec [--conf OVERLAY]... run|<stage>|config|neighbors|annotate|vacuum [key.sub=value ...]

Expected failures (bad config, bad catalog, bad input) print one clear
line and exit 2; a failed executor-side batch prints the one line naming its stage and
row batch (pipelines/faults.py) and exits 1, as does a table file failing its page checksums
on a read or in `prodvec verify` (one line naming the file); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import NoReturn

from pipelines.core.config import Config, confine, load_config
from pipelines.core.errors import ConfigError, ProdvecError, TableVerifyError
from pipelines.core.faults import task_error
from pipelines.core.secrets import RedactingFilter, redact_text
from pipelines.stages.registry import STAGES, run_pipeline, run_stage, summary

__all__ = ["main"]

log = logging.getLogger("prodvec")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Parser(argparse.ArgumentParser):
    """A usage mistake ends, like every expected failure, in one `prodvec: error:` line
    (exit 2); `prodvec COMMAND --help` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"prodvec: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    options = _Parser(add_help=False)
    options.add_argument(
        "-c",
        "--conf",
        action="append",
        default=None,
        metavar="OVERLAY",
        help="overlay name in conf/ or a YAML path, applied after conf/base.yaml "
        "(repeatable; default: local)",
    )
    options.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="Python log level (default INFO)",
    )
    common = _Parser(add_help=False, parents=[options])
    common.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied last"
    )
    parser = _Parser(prog="prodvec", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[common], help="run every built stage in order")
    commands.add_parser("config", parents=[common], help="print the resolved configuration")
    for stage in STAGES:
        sub = commands.add_parser(stage.name, parents=[common], help=stage.purpose)
        if stage.name == "embed":
            _embed_arguments(sub)
    _neighbors_arguments(
        commands.add_parser(
            "neighbors",
            parents=[options],
            help="the products most similar to one, from the saved index of a table version",
        )
    )
    _annotate_arguments(
        commands.add_parser(
            "annotate",
            parents=[common],
            help="the next products to label for one category (ProductNet's mixed strategy), "
            "as CSV",
        )
    )
    vacuum = commands.add_parser(
        "vacuum",
        parents=[common],
        help="delete embedding-table files no retained version references (crashed runs' too)",
    )
    vacuum.add_argument("--table", help="table path (default: embed.table_path)")
    vacuum.add_argument(
        "--retention-hours",
        type=int,
        default=None,
        help="keep files younger than this (default: embed.vacuum_retention_hours)",
    )
    vacuum.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    vacuum.add_argument(
        "--force",
        action="store_true",
        help="allow a retention below embed.vacuum_min_retention_hours (files a running embed "
        "has written but not yet committed may be deleted)",
    )
    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="check a table version's files: page checksums, schema, dimension, ids, row counts",
    )
    verify.add_argument("--table", help="table path (default: embed.table_path)")
    verify.add_argument(
        "--version", type=int, default=None, help="table version (default: the latest)"
    )
    return parser


def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    """`prodvec embed` alone runs the stage (clean catalog -> embedding table); with --input
    it embeds one file ad hoc and touches no table."""
    parser.description = (
        "Without --input: the embed stage (the clean catalog into the "
        "embedding table, model from --model or embed.model_uri). With "
        "--input: ad hoc, clean and embed one CSV / JSON lines / Parquet "
        "file or folder into --output (Parquet, one row per input row); "
        "no table is touched."
    )
    parser.add_argument(
        "--model",
        help="model URI: models:/name@alias, models:/name/version, "
        "runs:/... (default: embed.model_uri, else the @candidate model)",
    )
    parser.add_argument("--input", help="ad hoc: the products file or folder to embed")
    parser.add_argument("--output", help="ad hoc: output Parquet folder (required with --input)")
    parser.add_argument("--id-col", default="id", help="ad hoc: product id column (default id)")
    parser.add_argument("--text-col", default="title", help="ad hoc: title column (default title)")
    parser.add_argument("--group-col", help="ad hoc: product group column (per-group models)")
    parser.add_argument(
        "--format",
        choices=["csv", "json", "parquet"],
        help="ad hoc: input format (default: by extension, else parquet)",
    )


def _annotate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--category", required=True, help="the label being built")
    parser.add_argument(
        "--labels",
        required=True,
        help="CSV of labels so far: product_id,category,label[,source] (absent: none yet)",
    )
    parser.add_argument("-n", type=int, default=50, help="how many products (default 50)")
    parser.add_argument(
        "--strategy",
        choices=["mixed", "knn", "keyword", "uncertainty", "random"],
        default="mixed",
        help="where suggestions come from (default mixed)",
    )
    parser.add_argument("--keywords", default="", help="comma-separated words of the category")
    parser.add_argument(
        "--version", type=int, default=None, help="embedding-table version (default: latest)"
    )
    parser.add_argument("--output", help="CSV file to write (default: standard output)")


def _annotate(config: Config, args: argparse.Namespace) -> str:
    import csv
    import io

    from pipelines.analysis.annotate import LABEL_COLUMNS, next_batch  # sklearn loads only here

    confine(config, "--labels", args.labels)
    rows = next_batch(
        config,
        args.category,
        Path(args.labels),
        args.n,
        strategy=args.strategy,
        keywords=[word.strip() for word in args.keywords.split(",") if word.strip()],
        version=args.version,
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [*LABEL_COLUMNS, "title"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if args.output is None:
        return buffer.getvalue().rstrip("\n")
    confine(config, "--output", args.output)
    Path(args.output).write_text(buffer.getvalue(), encoding="utf-8")
    return f"annotate {args.category}: {len(rows)} products to label -> {args.output}"


def _neighbors_arguments(parser: argparse.ArgumentParser) -> None:
    """PRODUCT_ID comes before the overrides, so it is declared before them."""
    parser.add_argument("product_id", metavar="PRODUCT_ID", help="the product to start from")
    parser.add_argument("-k", type=int, default=10, help="how many neighbours (default 10)")
    parser.add_argument(
        "--version",
        type=int,
        default=None,
        help="embedding-table version whose index answers (default: latest)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied last"
    )


def _neighbors(config: Config, args: argparse.Namespace) -> str:
    from pipelines.stages.index import (
        neighbours_report,  # faiss loads only for this command
    )

    return neighbours_report(config, args.product_id, args.k, args.version)


def _embed(config: Config, args: argparse.Namespace) -> str:
    from pipelines.core import tracking
    from pipelines.core.spark import get_spark
    from pipelines.model_types.serving import default_model_uri  # torch loads only here
    from pipelines.stages.embed import embed_file

    if not (args.input and args.output):
        raise ConfigError("prodvec embed ad hoc needs both --input and --output")
    confine(config, "--input", args.input)
    confine(config, "--output", args.output)
    tracking.configure(config)
    counts = embed_file(
        get_spark(config.spark),
        config,
        model_uri=default_model_uri(config),
        input_path=args.input,
        output=args.output,
        id_col=args.id_col,
        text_col=args.text_col,
        group_col=args.group_col,
        fmt=args.format,
    )
    return f"embed {args.input} -> {args.output}: {counts}"


def _vacuum(config: Config, args: argparse.Namespace) -> str:
    from pipelines.table import vacuum  # deltalake loads only for this command

    path = args.table or config.outputs.table
    confine(config, "--table", path)
    hours = (
        config.embed.vacuum_retention_hours
        if args.retention_hours is None
        else args.retention_hours
    )
    floor = config.embed.vacuum_min_retention_hours
    if hours < floor and not args.force:
        raise ConfigError(
            f"vacuum --retention-hours {hours} is below embed.vacuum_min_retention_hours={floor}: "
            "files a running embed has written but not yet committed would be deleted "
            "(--force to do it anyway)"
        )
    removed = vacuum(path, dry_run=args.dry_run, retention_hours=hours)
    verb = "would remove" if args.dry_run else "removed"
    return "\n".join([f"vacuum {path}: {verb} {len(removed)} file(s)", *removed])


def _verify(config: Config, args: argparse.Namespace) -> str:
    from pipelines.table.verify import verify  # deltalake loads only for this command

    path = args.table or config.outputs.table
    confine(config, "--table", path)
    checked = verify(path, args.version)
    return (
        f"verify {path} version {checked.version}: {checked.files} file(s), {checked.rows} rows, "
        f"dimension {checked.dimension}: ok"
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes all positionals at their first run, so overrides written after an
    # option (`neighbors ID -k 3 workdir=...`) arrive here: they are overrides all the same.
    if extra and not all("=" in item and not item.startswith("-") for item in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("py4j", "alembic", "urllib3", "mlflow.store.db.utils", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Which build runs: under spark-submit, the wheel given with --py-files.
    log.info("prodvec %s from %s", version("prodvec"), Path(__file__).parent)
    secrets: frozenset[str] = frozenset()
    try:
        overrides = list(args.overrides)
        if args.command == "embed" and args.model:  # validated (and confined) like the rest
            overrides.append(f"embed.model_uri={args.model}")
        config = load_config(args.conf or ["local"], overrides)
        secrets = config.secrets
        for handler in logging.getLogger().handlers:
            handler.addFilter(RedactingFilter(secrets))
        if args.command == "config":
            print(config.to_yaml(), end="")
        elif args.command == "neighbors":
            print(_neighbors(config, args))
        elif args.command == "annotate":
            print(_annotate(config, args))
        elif args.command == "vacuum":
            print(_vacuum(config, args))
        elif args.command == "verify":
            print(_verify(config, args))
        elif args.command == "embed" and (args.input or args.output):
            print(_embed(config, args))
        elif args.command == "run":
            print(summary(config, run_pipeline(config)))
        else:
            result = run_stage(args.command, config)
            print(f"{args.command}: {result.rows} -> {result.outputs}")
    except TableVerifyError as err:  # the table is damaged: not a usage error
        print(f"prodvec: error: {redact_text(str(err), secrets)}", file=sys.stderr)
        return 1
    except ProdvecError as err:
        print(f"prodvec: error: {redact_text(str(err), secrets)}", file=sys.stderr)
        return 2
    except Exception as err:
        from pipelines.table.storage import damaged_file  # Spark's failure: the table is loaded

        # an executor's TaskError, or a table file failing its checksums, inside Spark's wrapping
        failed = task_error(err) or damaged_file(err)
        if failed is None:
            raise
        log.debug("executor-side failure", exc_info=err)
        print(f"prodvec: error: {redact_text(str(failed), secrets)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
