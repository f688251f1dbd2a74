"""`prodvec` command line: `prodvec run` for the whole pipeline, `prodvec <stage>` for one.

    prodvec [--conf OVERLAY]... run|<stage>|config [key.sub=value ...]

Expected failures (bad config, bad catalog, a stage not built) print one clear
line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.config import load_config
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
    return parser


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
