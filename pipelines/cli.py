"""`prodvec` command line: `prodvec run` for the whole pipeline, `prodvec <stage>` for one.

    prodvec [--conf OVERLAY]... run|<stage>|config [key.sub=value ...]

Expected failures (bad config, bad catalog, a stage not built) print one clear
line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.config import Config, load_config
from pipelines.errors import ProdvecError
from pipelines.stages import STAGES, run_pipeline, run_stage, summary


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--conf",
        action="append",
        default=None,
        metavar="OVERLAY",
        help="overlay name in conf/ or a YAML path, applied after conf/base.yaml "
        "(repeatable; default: local)",
    )
    common.add_argument("--log-level", default="INFO", help="Python log level (default INFO)")
    common.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied last"
    )
    parser = argparse.ArgumentParser(prog="prodvec", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[common], help="run every built stage in order")
    commands.add_parser("config", parents=[common], help="print the resolved configuration")
    for stage in STAGES:
        commands.add_parser(stage.name, parents=[common], help=stage.purpose)
    vacuum = commands.add_parser(
        "vacuum", parents=[common],
        help="delete embedding-table files no retained version references (crashed runs' too)")
    vacuum.add_argument("--table", help="table path (default: embed.table_path)")
    vacuum.add_argument("--retention-hours", type=int, default=None,
                        help="keep files younger than this (default: embed.vacuum_retention_hours)")
    vacuum.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    return parser


def _vacuum(config: Config, table: str | None, hours: int | None, dry_run: bool) -> str:
    from pipelines.delta import table_path, vacuum  # deltalake loads only for this command

    path = table or table_path(config)
    hours = config.embed.vacuum_retention_hours if hours is None else hours
    removed = vacuum(path, dry_run=dry_run, retention_hours=hours)
    verb = "would remove" if dry_run else "removed"
    return "\n".join([f"vacuum {path}: {verb} {len(removed)} file(s)", *removed])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("py4j", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = load_config(args.conf or ["local"], args.overrides)
        if args.command == "config":
            print(config.to_yaml(), end="")
        elif args.command == "vacuum":
            print(_vacuum(config, args.table, args.retention_hours, args.dry_run))
        elif args.command == "run":
            print(summary(config, run_pipeline(config)))
        else:
            result = run_stage(args.command, config)
            print(f"{args.command}: {result.rows} -> {result.outputs}")
    except ProdvecError as err:
        print(f"prodvec: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
