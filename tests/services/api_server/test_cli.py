"""``visiona-api-server`` as an operator runs it: ``--help``, bad configuration, a busy
port, ``migrate``, a dev start, and serving until SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
import trio

from visiona_services.api_server.config import ApiConfig
from visiona_services.common.envconfig import variables

STRONG = "x7Gq2-strong-secret-value-0123456789abcdef"
PROCESS_TIMEOUT = 30.0


def _run(args: list[str], environ: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISIONA_")}
    env.update(environ)
    return subprocess.run(
        [sys.executable, "-m", "visiona_services.api_server", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )


def _environ(tmp_path: Path, **more: str) -> dict[str, str]:
    return {
        "VISIONA_DATA_DIR": str(tmp_path),
        "VISIONA_SESSION_SECRET": STRONG,
        "VISIONA_INTERNAL_SECRET": STRONG + "2",
        "VISIONA_STORAGE_SIGNING_SECRET": STRONG + "3",
        "VISIONA_OIDC_ISSUER": "http://127.0.0.1:9",
        "VISIONA_OIDC_CLIENT_ID": "visiona-web",
        **more,
    }


def test_help_lists_every_variable(tmp_path: Path) -> None:
    result = _run(["--help"], {})
    assert result.returncode == 0
    for variable in variables(ApiConfig).values():
        assert variable in result.stdout, variable


def test_a_bad_value_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = _run([], _environ(tmp_path, VISIONA_API_PORT="99999"))
    assert result.returncode == 2
    assert "VISIONA_API_PORT" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_missing_secret_refuses_the_start(tmp_path: Path) -> None:
    result = _run([], _environ(tmp_path, VISIONA_SESSION_SECRET=""))
    assert result.returncode == 2
    assert "VISIONA_SESSION_SECRET" in result.stderr


def test_a_busy_port_is_one_line_naming_the_address(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run([], _environ(tmp_path, VISIONA_API_PORT=str(port)))
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if "visiona-api-server" in line]
    assert f"127.0.0.1:{port}" in line and "in use" in line
    assert "Traceback" not in result.stderr


def test_migrate_builds_the_database_and_exits(tmp_path: Path) -> None:
    result = _run(["migrate"], _environ(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "visiona.db").exists()


def test_dev_prints_the_generated_secrets_once(tmp_path: Path) -> None:
    environ = {"VISIONA_ENV": "dev", "VISIONA_DATA_DIR": str(tmp_path)}
    result = _run(["migrate"], environ)
    assert result.returncode == 0, result.stderr
    kept = dict(
        line.split("=", 1) for line in (tmp_path / "dev-secrets.env").read_text().splitlines()
    )
    for variable, value in kept.items():
        assert f"{variable}={value}" in result.stdout


async def test_the_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISIONA_")}
    env.update(_environ(tmp_path, VISIONA_API_PORT="0"))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "visiona_services.api_server"],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(PROCESS_TIMEOUT):
            assert process.stderr is not None
            url = await _listening_url(process.stderr)
            async with httpx.AsyncClient() as client:
                response = await client.get(f"{url}/healthz")
            assert response.status_code == 200
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _listening_url(stderr: trio.abc.ReceiveStream) -> str:
    """The URL of the "listening" JSON log line (each line has an ISO 8601 time)."""
    buffered = b""
    while True:
        chunk = await stderr.receive_some()
        if not chunk:
            pytest.fail(f"the process ended before listening: {buffered.decode()}")
        buffered += chunk
        for line in buffered.decode(errors="replace").splitlines():
            if '"msg": "listening"' in line:
                record = json.loads(line)
                assert "T" in record["ts"]
                return str(record["urls"][0])
