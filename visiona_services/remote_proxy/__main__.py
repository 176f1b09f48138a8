"""``visiona-remote-proxy`` / ``python -m visiona_services.remote_proxy``.

Configured by environment variables only (``--help`` lists them with their defaults). Exit
codes: 0 stopped by SIGINT or SIGTERM (after the graceful shutdown); 1 a listener's address
cannot be bound (one line naming it); 2 a bad argument or variable (one line naming it).
"""

from __future__ import annotations

import argparse
import sys

from visiona_tunnel.agent import OneLineArgumentParser

from ..common.envconfig import ConfigError, describe_variables
from ..common.lifecycle import fail, run_service
from ..common.logs import configure_logging
from .config import ProxyConfig
from .service import logger, serve_remote_proxy

PROG = "visiona-remote-proxy"


def build_parser() -> argparse.ArgumentParser:
    return OneLineArgumentParser(
        prog=PROG,
        description="The visionA remote-proxy: agents' tunnels (:3800) and the internal API "
        "the api-server reaches them through (:3801). See docs/remote-proxy.md.",
        epilog="configuration (environment variables, defaults in brackets):\n"
        + describe_variables(ProxyConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    # JSON lines from the first one on: reading the configuration may log already.
    configure_logging("info")
    try:
        config = ProxyConfig.from_env()
    except ConfigError as exc:
        return fail(PROG, str(exc), 2)
    configure_logging(config.log_level)
    if config.secret_generated:  # VISIONA_ENV=dev: the api-server needs the same secret
        print(f"{PROG}: VISIONA_ENV=dev, generated (give the api-server the same):")
        print(f"  VISIONA_INTERNAL_SECRET={config.internal_secret}")
        sys.stdout.flush()
    return run_service(PROG, serve_remote_proxy, config, logger)


if __name__ == "__main__":
    sys.exit(main())
