"""``visiona-api-server`` / ``python -m visiona_services.api_server``."""

from __future__ import annotations

import argparse
import sys

from visiona_tunnel.agent import OneLineArgumentParser

from ..common.envconfig import ConfigError, describe_variables
from ..common.lifecycle import fail, run_service
from ..common.logs import configure_logging
from .config import ApiConfig
from .db import Database
from .server import logger, serve_api_server

PROG = "visiona-api-server"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG,
        description="The visionA api-server: OIDC login, devices, models (REST/WS, :3721).",
        epilog="configuration (environment variables, defaults in brackets):\n"
        + describe_variables(ApiConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="apply migrations, then serve (the default)")
    commands.add_parser("migrate", help="apply database migrations, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("info")
    try:
        config, generated = ApiConfig.from_env()
        configure_logging(config.log_level)
        if args.command != "migrate":
            config.require_oidc()
    except ConfigError as exc:
        return fail(PROG, str(exc), 2)
    if generated:  # VISIONA_ENV=dev: the operator needs these for the remote-proxy
        print(f"{PROG}: VISIONA_ENV=dev, generated secrets (kept in {config.data_dir}):")
        for variable, value in generated.items():
            print(f"  {variable}={value}")
        sys.stdout.flush()
    if args.command == "migrate":
        database = Database(config.resolved_database_url)
        try:
            database.migrate()
        finally:
            database.dispose()
        print(f"{PROG}: the database is up to date")
        return 0
    return run_service(PROG, serve_api_server, config, logger)


if __name__ == "__main__":
    sys.exit(main())
