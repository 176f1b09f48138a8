"""``visiona-remote-proxy`` / ``python -m visiona_services.remote_proxy``."""

from __future__ import annotations

import sys

import trio

from ..common.envconfig import ConfigError
from ..common.lifecycle import serve_until_signal
from ..common.logs import configure_logging
from .config import ProxyConfig
from .service import logger, serve_remote_proxy


def main() -> int:
    # JSON lines from the first one on: reading the configuration may log already.
    configure_logging("info")
    try:
        config = ProxyConfig.from_env()
    except ConfigError as exc:
        print(f"visiona-remote-proxy: {exc}", file=sys.stderr)
        return 2
    try:
        configure_logging(config.log_level)
    except ValueError as exc:
        print(f"visiona-remote-proxy: VISIONA_LOG_LEVEL: {exc}", file=sys.stderr)
        return 2
    trio.run(serve_until_signal, serve_remote_proxy, config, logger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
