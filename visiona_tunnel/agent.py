"""``visiona-agent``: pair with the api-server once, then keep a tunnel to the relay.

    visiona-agent --api-url http://host:3721 --pairing-token vAc_... --local 127.0.0.1:8080
    visiona-agent --local 127.0.0.1:8080              # later: the stored credentials
    visiona-agent --relay-url ws://relay:3800/tunnel/connect --token ... --local 127.0.0.1:8080

The first form trades the one-time pairing token for a device token and stores it (with the
device id and the relay URL) in ``--credentials`` (default
``$XDG_CONFIG_HOME/visiona/agent.json``), then dials the relay; later starts use that file.
The third form dials with a device token given directly. Tokens may come from
``VISIONA_PAIRING_TOKEN`` and ``VISIONA_AGENT_TOKEN`` instead, so that they do not show in
``ps``. Logs are JSON lines on stderr. Exit codes: 0 stopped by SIGINT or SIGTERM; 2 bad
arguments, the pairing token refused, or the credentials file unusable; 1 the credentials
could not be stored after pairing. See docs/agent.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import ssl
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import attrs
import trio

from .client import (
    ClientConfig,
    ClientHooks,
    TokenRefused,
    TunnelClient,
    check_relay_url,
    parse_local_addr,
)
from .credentials import (
    CredentialsError,
    DeviceCredentials,
    default_credentials_path,
    load_credentials,
    prepare_credentials_dir,
    store_credentials,
)
from .pairing import PairingError, is_pairing_token, pair_device, parse_api_url

TOKEN_ENV = "VISIONA_AGENT_TOKEN"
PAIRING_TOKEN_ENV = "VISIONA_PAIRING_TOKEN"
LOG_LEVEL_ENV = "VISIONA_LOG_LEVEL"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Exit codes: stopped by a signal; credentials not stored after pairing; cannot start.
EXIT_STOPPED = 0
EXIT_NOT_STORED = 1
EXIT_USAGE = 2
#: Logged (at warning) each time the relay refuses the device token.
UNPAIRED_HINT = (
    "the relay refused the device token: the device may have been unpaired; "
    "re-pair with a new pairing token"
)

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


class AgentExit(Exception):
    """Stop before (or instead of) running: one line on stderr, then ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- arguments --------------------------------------------------------------------------------


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage block), exit code 2, and never
    echoes values it does not know (one might be a token). The services' console scripts
    use it too."""

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            unknown = message.removeprefix(prefix).split(" ")
            options = [word.split("=", 1)[0] for word in unknown if word.startswith("-")]
            message = "unrecognized arguments" + (f": {' '.join(options)}" if options else "")
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def parse_address(value: str) -> tuple[str, int]:
    try:
        return parse_local_addr(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_relay_url(value: str) -> str:
    try:
        check_relay_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def parse_api_url_argument(value: str) -> str:
    try:
        parse_api_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value.rstrip("/")


def parse_jitter(value: str) -> float:
    try:
        jitter = float(value)
    except ValueError:
        jitter = math.nan
    if not 0.0 <= jitter <= 1.0:
        raise argparse.ArgumentTypeError("must be a number from 0 to 1")
    return jitter


def parse_ca_file(value: str) -> ssl.SSLContext:
    """``--ca-file``: a client context trusting the PEM certificates in the file."""
    try:
        return ssl.create_default_context(cafile=value)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise argparse.ArgumentTypeError(f"cannot load {value!r}: {reason}") from None


def parse_log_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    parser = OneLineArgumentParser(
        prog="visiona-agent",
        description=(__doc__ or "").split("\n")[0],
        epilog="See docs/agent.md: the credentials file, the exit codes.",
    )
    parser.add_argument("--local", required=True, type=parse_address, help="local HOST:PORT")
    pairing = parser.add_argument_group("pairing (once; later starts use --credentials)")
    pairing.add_argument(
        "--api-url", type=parse_api_url_argument, help="http(s)://host[:port][/prefix]"
    )
    pairing.add_argument(
        "--pairing-token", help=f"one-time token vAc_... (default: ${PAIRING_TOKEN_ENV})"
    )
    pairing.add_argument(
        "--credentials",
        type=Path,
        help=f"credentials file (default: {default_credentials_path(env)})",
    )
    direct = parser.add_argument_group("a device token given directly (no pairing)")
    direct.add_argument(
        "--relay-url", type=parse_relay_url, help="ws(s)://host:port/tunnel/connect"
    )
    direct.add_argument("--token", help=f"device token (default: ${TOKEN_ENV})")
    parser.add_argument(
        "--ca-file",
        type=parse_ca_file,
        metavar="PATH",
        help="PEM certificates a wss:// relay's certificate must chain to (default: the "
        "system's trust store)",
    )
    parser.add_argument(
        "--jitter",
        type=parse_jitter,
        default=ClientConfig().backoff_jitter,
        help="backoff jitter fraction, 0 to 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        type=parse_log_level,
        help=f"{', '.join(LOG_LEVELS)} (default: ${LOG_LEVEL_ENV} or info)",
    )
    return parser


def parse_arguments(
    argv: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """The arguments, ``--log-level`` defaulting to ``$VISIONA_LOG_LEVEL`` (or ``info``).

    A bad argument, or a bad ``VISIONA_LOG_LEVEL`` (named as such), is one line on stderr
    and exit code 2.
    """
    env = os.environ if environ is None else environ
    parser = build_parser(env)
    args = parser.parse_args(argv)
    if args.log_level is None:
        try:
            args.log_level = parse_log_level(env.get(LOG_LEVEL_ENV, "info"))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{LOG_LEVEL_ENV}: {exc}")
    return args


# -- what to do -------------------------------------------------------------------------------


@attrs.frozen
class Connect:
    """Dial ``relay_url`` with ``token``. ``credentials_path``: where it came from, if a file."""

    relay_url: str
    token: str = attrs.field(repr=False)
    credentials_path: Path | None = None


@attrs.frozen
class Pair:
    """Exchange ``pairing_token`` at ``api_url``, store the result in ``credentials_path``."""

    api_url: str
    pairing_token: str = attrs.field(repr=False)
    credentials_path: Path


def plan_start(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Connect | Pair:
    """What the parsed arguments ask for: dial directly, dial with stored credentials, or
    pair first. Reads the credentials file; creates its directory when pairing is next.

    Raises:
        AgentExit: the arguments do not go together, the pairing token is malformed, or the
        credentials file cannot be used.
    """
    env = os.environ if environ is None else environ
    pairing_token: str | None = args.pairing_token or env.get(PAIRING_TOKEN_ENV) or None
    if args.relay_url is not None:
        if args.api_url is not None or args.pairing_token is not None:
            raise AgentExit(
                "--relay-url (with --token) and --api-url/--pairing-token are two ways to "
                "connect: give one"
            )
        token = args.token or env.get(TOKEN_ENV)
        if not token:
            raise AgentExit(f"no token: pass --token or set {TOKEN_ENV}")
        return Connect(args.relay_url, token)
    if args.token is not None:
        raise AgentExit("--token needs --relay-url")
    if pairing_token is not None and not is_pairing_token(pairing_token):
        raise AgentExit(
            f"the pairing token (--pairing-token or ${PAIRING_TOKEN_ENV}) must be vAc_ "
            "followed by 32 lower-case hex digits"
        )
    path: Path = args.credentials or default_credentials_path(env)
    try:
        stored = load_credentials(path)
    except CredentialsError as exc:
        raise AgentExit(str(exc)) from None
    if stored is not None:
        if pairing_token is not None:
            logger.info(
                "the device is already paired: the pairing token is ignored",
                extra={
                    "device_id": stored.device_id,
                    "credentials": str(path),
                    "re_pair": "remove the credentials file first",
                },
            )
        return Connect(stored.relay_url, stored.device_token, path)
    if pairing_token is None:
        if args.api_url is None:
            raise AgentExit(
                f"not paired yet (no {path}): pass --api-url and --pairing-token, "
                "or --relay-url and --token"
            )
        raise AgentExit(f"--api-url needs --pairing-token (or ${PAIRING_TOKEN_ENV})")
    if args.api_url is None:
        raise AgentExit("--pairing-token needs --api-url")
    try:
        prepare_credentials_dir(path)
    except CredentialsError as exc:
        raise AgentExit(str(exc)) from None
    return Pair(args.api_url, pairing_token, path)


# -- running ----------------------------------------------------------------------------------


def unpaired_hint_hooks(credentials_path: Path | None = None) -> ClientHooks:
    """Hooks that log :data:`UNPAIRED_HINT` (warning) each time the relay refuses the token."""
    extra: dict[str, object] = {}
    if credentials_path is not None:
        extra["credentials"] = str(credentials_path)
        extra["re_pair"] = (
            "remove the credentials file, then start with --api-url and a new --pairing-token"
        )

    def on_dial_failed(attempt: int, error: BaseException) -> None:
        if isinstance(error, TokenRefused):
            logger.warning(
                UNPAIRED_HINT, extra={"status": error.status_code, "attempt": attempt, **extra}
            )

    return ClientHooks(on_dial_failed=on_dial_failed)


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


async def pair_and_store(plan: Pair, config: ClientConfig) -> Connect:
    """Exchange the pairing token (retrying while the api-server is unavailable), store the
    credentials, and return how to dial.

    Raises:
        AgentExit: the token was refused (or the answer was not the contract's), or the
        credentials could not be stored.
    """
    try:
        result = await pair_device(
            plan.api_url,
            plan.pairing_token,
            backoff_base=config.backoff_base,
            backoff_cap=config.backoff_cap,
            backoff_jitter=config.backoff_jitter,
        )
    except PairingError as exc:
        raise AgentExit(str(exc)) from None
    credentials = DeviceCredentials.of_pairing(result, plan.api_url)
    try:
        await trio.to_thread.run_sync(store_credentials, plan.credentials_path, credentials)
    except CredentialsError as exc:
        raise AgentExit(
            f"paired as {result.device_id}, but {exc}; the pairing token is spent: "
            "create a new one",
            EXIT_NOT_STORED,
        ) from None
    logger.info(
        "paired",
        extra={
            "device_id": result.device_id,
            "relay": result.relay_url,
            "credentials": str(plan.credentials_path),
        },
    )
    return Connect(result.relay_url, result.device_token, plan.credentials_path)


async def run(plan: Connect | Pair, local: tuple[str, int], config: ClientConfig) -> int:
    """Pair if asked to, then keep the tunnel up; until SIGINT or SIGTERM (exit code 0).

    Raises:
        AgentExit: pairing failed for good, or its result could not be stored.
    """
    client: TunnelClient | None = None
    failed: AgentExit | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            pairing = trio.CancelScope()

            async def stop_on_signal() -> None:
                async for signum in signals:
                    logger.info("stopping", extra={"signal": signal.Signals(signum).name})
                    pairing.cancel()
                    if client is not None:
                        client.stop()
                    return

            nursery.start_soon(stop_on_signal)
            with pairing:
                try:
                    connect = await pair_and_store(plan, config) if isinstance(plan, Pair) else plan
                except AgentExit as exc:  # raised below, outside the nursery (no group)
                    failed = exc
                else:
                    client = TunnelClient(
                        connect.relay_url,
                        connect.token,
                        local,
                        hooks=unpaired_hint_hooks(connect.credentials_path),
                        config=config,
                    )
            if client is not None:
                await client.run()
            nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return EXIT_STOPPED


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLineFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    logging.Formatter.converter = time.gmtime
    try:
        plan = plan_start(args)
        config = ClientConfig(backoff_jitter=args.jitter, ssl_context=args.ca_file)
        return trio.run(run, plan, args.local, config)
    except AgentExit as exc:
        print(f"visiona-agent: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
