"""``visiona-agent``: run a tunnel client until SIGINT or SIGTERM.

    visiona-agent --relay-url ws://relay:3800/tunnel/connect --local 127.0.0.1:8080

The token comes from ``--token`` or, so that it does not show in ``ps``, from the
``VISIONA_AGENT_TOKEN`` environment variable. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime

import trio

from .client import ClientConfig, TunnelClient, parse_local_addr

TOKEN_ENV = "VISIONA_AGENT_TOKEN"
logger = logging.getLogger("visiona_tunnel.agent")
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({})))


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update((k, v) for k, v in vars(record).items() if k not in _STANDARD_ATTRS)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def parse_address(value: str) -> tuple[str, int]:
    try:
        return parse_local_addr(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visiona-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--relay-url", required=True, help="ws(s)://host:port/tunnel/connect")
    parser.add_argument("--token", help=f"device token (default: ${TOKEN_ENV})")
    parser.add_argument("--local", required=True, type=parse_address, help="local HOST:PORT")
    parser.add_argument("--jitter", type=float, default=0.2, help="backoff jitter fraction")
    parser.add_argument("--log-level", default=os.environ.get("VISIONA_LOG_LEVEL", "info"))
    return parser


async def run_agent(client: TunnelClient) -> None:
    """Run ``client`` until SIGINT or SIGTERM, then close its session and return."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    logger.info("stopping", extra={"signal": signal.Signals(signum).name})
                    client.stop()
                    return

            nursery.start_soon(stop_on_signal)
            await client.run()
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        print(f"visiona-agent: no token: pass --token or set {TOKEN_ENV}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLineFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    logging.Formatter.converter = time.gmtime
    client = TunnelClient(
        args.relay_url, token, args.local, config=ClientConfig(backoff_jitter=args.jitter)
    )
    trio.run(run_agent, client)
    return 0


if __name__ == "__main__":
    sys.exit(main())
