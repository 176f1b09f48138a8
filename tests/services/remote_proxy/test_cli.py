"""``visiona-remote-proxy`` as an operator runs it: ``--help``, a bad argument or variable,
a busy port on either listener, a dev start that prints its generated secret, and serving
until SIGTERM."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
import trio
from support.internalapi import SECRET, call, json_of
from support.proxyprocess import (
    COMMAND,
    EPHEMERAL,
    PROCESS_TIMEOUT,
    Output,
    is_listening,
    proxy_env,
    stop,
)

from visiona_services.common.envconfig import variables
from visiona_services.remote_proxy.config import ProxyConfig


def _run(args: list[str], environ: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        env=proxy_env(environ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )


def _one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one ``visiona-remote-proxy: ...`` line on stderr (log lines may come before)."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert line.startswith("visiona-remote-proxy: "), line
    return line


def test_help_lists_every_variable_with_its_meaning() -> None:
    result = _run(["--help"], {})
    assert result.returncode == 0, result.stderr
    for variable in variables(ProxyConfig).values():
        assert variable in result.stdout, variable
    for field in attrs.fields(ProxyConfig):
        if "env" in field.metadata:
            assert field.metadata["help"], f"{field.metadata['env']} has no help text"
            assert field.metadata["help"] in result.stdout.replace("\n      ", " ")
    assert "[3800]" in result.stdout and "[3801]" in result.stdout


@pytest.mark.parametrize("args", [["--secret=sekrit-value"], ["sekrit-value"], ["-x"]])
def test_an_unknown_argument_is_one_line_exit_2_without_its_value(args: list[str]) -> None:
    result = _run(args, {"VISIONA_INTERNAL_SECRET": SECRET})
    line = _one_line(result, 2)
    assert "unrecognized arguments" in line
    assert "sekrit-value" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VISIONA_TUNNEL_PORT", "not-a-port"),
        ("VISIONA_PROXY_INTERNAL_PORT", "99999"),
        ("VISIONA_LOG_LEVEL", "loud"),
        ("VISIONA_ENV", "staging"),
        ("VISIONA_PROXY_FORWARD_TIMEOUT", "-1"),
        ("VISIONA_PROXY_STATIC_TOKENS", "no-equals-sign"),
        ("VISIONA_PROXY_STATIC_TOKENS_FILE", "/nonexistent/tokens"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2_naming_it(variable: str, value: str) -> None:
    result = _run([], {"VISIONA_INTERNAL_SECRET": SECRET, variable: value})
    assert variable in _one_line(result, 2)


def test_a_missing_secret_outside_dev_is_one_line_and_exit_2() -> None:
    result = _run([], EPHEMERAL)
    assert "VISIONA_INTERNAL_SECRET" in _one_line(result, 2)
    assert result.stdout == ""


@pytest.mark.parametrize("variable", ["VISIONA_TUNNEL_PORT", "VISIONA_PROXY_INTERNAL_PORT"])
def test_a_busy_port_is_one_line_naming_the_address_and_exit_1(variable: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        environ = {**EPHEMERAL, "VISIONA_INTERNAL_SECRET": SECRET, variable: str(port)}
        result = _run([], environ)
    line = _one_line(result, 1)
    assert f"127.0.0.1:{port}" in line and "in use" in line and variable in line
    assert SECRET not in result.stderr


# -- running processes ----------------------------------------------------------------------


def _internal_port(line: str) -> int:
    record: dict[str, Any] = json.loads(line)
    assert "T" in record["ts"]  # ISO 8601
    return int(record["internal"][0].rsplit(":", 1)[1])


async def _start(environ: Mapping[str, str]) -> trio.Process:
    return await trio.lowlevel.open_process(
        COMMAND,
        env=proxy_env(environ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def test_dev_prints_the_generated_secret_once_and_it_opens_the_internal_api() -> None:
    process = await _start({**EPHEMERAL, "VISIONA_ENV": "dev"})
    try:
        with trio.fail_after(PROCESS_TIMEOUT):
            stdout, stderr = Output(process.stdout), Output(process.stderr)
            port = _internal_port(await stderr.line(is_listening))
            printed = await stdout.line(lambda line: "VISIONA_INTERNAL_SECRET=" in line)
            secret = printed.split("=", 1)[1]
            bearer = [("authorization", f"Bearer {secret}")]
            response = await call(port, "GET", "/internal/health", headers=bearer, auth=False)
            assert (response.status, json_of(response)["data"]["draining"]) == (200, False)
            assert await stop(process) == 0
            while await stdout.stream.receive_some():
                pass
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert len(secret) >= 32
    assert stdout.text.count(secret) == 1, stdout.text
    assert secret not in stderr.text  # logged as generated, never shown in the logs
    assert any("generated" in line for line in stderr.text.splitlines())


async def test_the_process_serves_and_exits_0_on_sigterm() -> None:
    process = await _start({**EPHEMERAL, "VISIONA_INTERNAL_SECRET": SECRET})
    try:
        with trio.fail_after(PROCESS_TIMEOUT):
            stderr = Output(process.stderr)
            port = _internal_port(await stderr.line(is_listening))
            assert (await call(port, "GET", "/internal/health")).status == 200
            assert await stop(process) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
