"""``visiona-remote-proxy`` / ``python -m visiona_services.remote_proxy``."""

from __future__ import annotations

import signal
import sys

import trio

from ..common.envconfig import ConfigError
from ..common.logs import configure_logging
from .config import ProxyConfig
from .service import logger, serve_remote_proxy


async def run(config: ProxyConfig) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            proxy = await nursery.start(serve_remote_proxy, config)
            async for signum in signals:
                logger.info("stopping", extra={"signal": signal.Signals(signum).name})
                proxy.stop()
                break


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
    trio.run(run, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
