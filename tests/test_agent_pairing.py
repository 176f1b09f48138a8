"""The agent pairs itself: ``visiona_tunnel.pairing`` (the exchange, sans-IO and over trio),
``visiona_tunnel.credentials`` (the stored file) and ``visiona-agent``'s pairing flags.

The api-server is ``support.pairingapi.PairingApi``, a small real HTTP server implementing
the exchange's contract; the relay is our Python relay (``support.pyrelay``); the agent runs
as a process (``support.agentprocess``). Waits are on log lines, hooks and recorded
requests, each bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from support.agentprocess import (
    START_TIMEOUT,
    AgentProcess,
    Finished,
    LogLine,
    agent_process,
    has_msg,
    is_state,
    run_agent_to_exit,
)
from support.pairingapi import (
    Canned,
    PairingApi,
    error_body,
    new_pairing_token,
    start_pairing_api,
    tls_contexts,
)
from support.pyagent import HookRecorder
from support.pyrelay import PyRelay, start_py_relay
from support.tunnelhttp import LocalServer, closed_port

from visiona_tunnel import agent as agent_module
from visiona_tunnel.client import ClientConfig, ClientHooks, TokenRefused, TunnelClient
from visiona_tunnel.credentials import (
    CredentialsError,
    DeviceCredentials,
    default_credentials_path,
    load_credentials,
    store_credentials,
)
from visiona_tunnel.pairing import (
    MAX_RESPONSE_SIZE,
    MAX_RETRY_AFTER,
    ExchangeResponse,
    PairingError,
    PairingExchange,
    PairingFailed,
    PairingRefused,
    PairingUnavailable,
    exchange_pairing_token,
    interpret_exchange_response,
    is_pairing_token,
    pair_device,
    parse_api_url,
    parse_exchange_response,
    parse_retry_after,
)

#: Upper bound for a test that runs in this process.
TEST_TIMEOUT = 15.0
#: Upper bound for a test that starts agent processes (interpreter starts included).
PROCESS_TEST_TIMEOUT = 40.0
TOKEN = "vAc_" + "0123456789abcdef" * 2
DEVICE_ID = "device-1"
RELAY_TOKEN = "dt_stored"


def answer(status: int, body: bytes | str | dict[str, Any], *headers: str) -> bytes:
    """An HTTP/1.1 response as the api-server would send it."""
    if isinstance(body, dict):
        body = json.dumps(body)
    data = body.encode() if isinstance(body, str) else body
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(data)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def ok_body(relay_url: str = "ws://relay:3800/tunnel/connect") -> dict[str, Any]:
    data = {"device_id": DEVICE_ID, "device_token": "dt_secret", "relay_url": relay_url}
    return {"success": True, "data": data}


# -- the request ------------------------------------------------------------------------------


def test_a_pairing_token_is_vac_and_32_lower_case_hex_digits() -> None:
    assert is_pairing_token(TOKEN)
    for bad in ("", "vAc_", TOKEN.upper(), "vac_" + TOKEN[4:], TOKEN + "0", TOKEN[:-1] + "g"):
        assert not is_pairing_token(bad), bad


def test_the_api_url_gives_scheme_host_port_and_prefix() -> None:
    plain = parse_api_url("http://host:3721")
    assert (plain.secure, plain.host, plain.port, plain.authority) == (
        False,
        "host",
        3721,
        "host:3721",
    )
    assert plain.exchange_target == "/api/pairing/exchange"
    secure = parse_api_url("https://[::1]/visiona/")
    assert (secure.secure, secure.host, secure.port, secure.authority) == (
        True,
        "::1",
        443,
        "[::1]",
    )
    assert secure.exchange_target == "/visiona/api/pairing/exchange"


@pytest.mark.parametrize(
    "url",
    [
        "ws://host:3721",
        "host:3721",
        "http://",
        "http://host:99999",
        "http://user:pw@host",
        "http://host/?q=1",
        "http://host/#f",
        "http://host/a b",
    ],
)
def test_an_api_url_that_is_not_http_host_port_prefix_is_refused(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_api_url(url)
    assert url not in str(raised.value)


def test_the_request_is_a_json_post_to_the_exchange_route_of_the_prefix() -> None:
    exchange = PairingExchange(parse_api_url("http://api.example:8080/p"), TOKEN)
    server = h11.Connection(h11.SERVER)
    server.receive_data(exchange.request)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    body = server.next_event()
    assert isinstance(body, h11.Data)
    assert isinstance(server.next_event(), h11.EndOfMessage)
    assert (request.method, request.target) == (b"POST", b"/p/api/pairing/exchange")
    headers = dict(request.headers)
    assert headers[b"host"] == b"api.example:8080"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    assert b"cookie" not in headers
    assert json.loads(body.data) == {"token": TOKEN}
    assert TOKEN not in repr(exchange)


def test_a_malformed_pairing_token_is_refused_before_a_request_is_made() -> None:
    with pytest.raises(ValueError) as raised:
        PairingExchange(parse_api_url("http://host"), "vAc_nothex")
    assert "vAc_nothex" not in str(raised.value)


# -- the answer -------------------------------------------------------------------------------


def test_a_200_answer_gives_the_device_id_token_and_relay_url() -> None:
    result = parse_exchange_response(answer(200, ok_body()))
    assert (result.device_id, result.device_token, result.relay_url) == (
        DEVICE_ID,
        "dt_secret",
        "ws://relay:3800/tunnel/connect",
    )
    assert "dt_secret" not in repr(result)


def test_an_answer_fed_a_byte_at_a_time_reads_the_same() -> None:
    raw = answer(200, ok_body())
    exchange = PairingExchange(parse_api_url("http://host"), TOKEN)
    responses = [exchange.receive_data(raw[i : i + 1]) for i in range(len(raw))]
    assert responses[:-1] == [None] * (len(raw) - 1)
    assert isinstance(responses[-1], ExchangeResponse)
    assert responses[-1].status == 200


def test_a_401_is_a_refused_pairing_token_with_the_servers_code() -> None:
    raw = answer(401, error_body("PAIRING_TOKEN_INVALID", "pairing token invalid"))
    with pytest.raises(PairingRefused) as raised:
        parse_exchange_response(raw)
    assert raised.value.status == 401
    assert raised.value.code == "PAIRING_TOKEN_INVALID"
    assert raised.value.request_id
    assert str(raised.value).startswith(
        "the pairing token was refused (used, expired, revoked or unknown)"
    )


def test_a_400_is_a_refused_pairing_request() -> None:
    with pytest.raises(PairingRefused) as raised:
        parse_exchange_response(answer(400, error_body("VALIDATION_ERROR", "token")))
    assert raised.value.status == 400


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_408_429_and_5xx_are_unavailable_with_the_servers_retry_after(status: int) -> None:
    raw = answer(status, error_body("RATE_LIMITED", "slow down"), "Retry-After: 7")
    with pytest.raises(PairingUnavailable) as raised:
        parse_exchange_response(raw)
    assert (raised.value.status, raised.value.retry_after) == (status, 7.0)


@pytest.mark.parametrize("status", [201, 204, 301, 302, 403, 404, 405, 409, 418])
def test_any_other_status_fails_for_good(status: int) -> None:
    body = b"" if status == 204 else b"{}"
    with pytest.raises(PairingFailed) as raised:
        parse_exchange_response(answer(status, body))
    assert raised.value.status == status


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"success": false, "data": {}}',
        json.dumps({"success": True, "data": {"device_id": "d", "device_token": "t"}}).encode(),
        json.dumps({"success": True, "data": {**ok_body()["data"], "device_token": 5}}).encode(),
        json.dumps({"success": True, "data": {**ok_body()["data"], "device_id": ""}}).encode(),
        json.dumps(ok_body("http://relay:3800/tunnel/connect")).encode(),
        json.dumps(ok_body("ws:///tunnel/connect")).encode(),
        b"[" * 100_000,
    ],
    ids=[
        "empty",
        "not-json",
        "array",
        "not-success",
        "no-relay-url",
        "token-not-a-string",
        "empty-device-id",
        "relay-url-http",
        "relay-url-no-host",
        "deep-nesting",
    ],
)
def test_a_200_whose_body_is_not_the_contracts_fails_for_good(body: bytes) -> None:
    exchange = PairingExchange(parse_api_url("http://host"), TOKEN, max_response_size=1 << 20)
    response = exchange.receive_data(answer(200, body))
    assert response is not None
    with pytest.raises(PairingFailed) as raised:
        interpret_exchange_response(response)
    assert raised.value.status == 200


@pytest.mark.parametrize(
    "raw",
    [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", b"SSH-2.0-OpenSSH\r\n"],
    ids=["nothing", "cut-short", "not-http"],
)
def test_an_answer_that_is_cut_short_or_not_http_is_unavailable(raw: bytes) -> None:
    with pytest.raises(PairingUnavailable):
        parse_exchange_response(raw)


def test_an_answer_larger_than_64_kib_is_unavailable() -> None:
    body = json.dumps({**ok_body(), "padding": "x" * MAX_RESPONSE_SIZE}).encode()
    with pytest.raises(PairingUnavailable, match="larger than"):
        parse_exchange_response(answer(200, body))


@given(st.binary(max_size=4096))
def test_parsing_arbitrary_bytes_raises_nothing_but_a_pairing_error(raw: bytes) -> None:
    with contextlib.suppress(PairingError):
        parse_exchange_response(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["success", "data", "error", "device_id", "device_token", "relay_url"])
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@given(
    status=st.integers(min_value=200, max_value=599),
    body=json_values.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=256),
    retry_after=st.none() | st.text(max_size=40).map(lambda text: text.encode("utf-8")),
)
def test_any_http_answer_is_a_result_or_a_pairing_error(
    status: int, body: bytes, retry_after: bytes | None
) -> None:
    headers = [(b"retry-after", retry_after)] if retry_after is not None else []
    try:
        result = interpret_exchange_response(ExchangeResponse(status, headers, body))
    except PairingError:
        return
    assert status == 200 and result.relay_url.startswith(("ws://", "wss://"))


@given(st.binary(max_size=64))
def test_retry_after_is_none_or_within_zero_and_the_limit(value: bytes) -> None:
    seconds = parse_retry_after(value, now=0.0)
    assert seconds is None or 0.0 <= seconds <= MAX_RETRY_AFTER


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    assert parse_retry_after(b"120") == 120.0
    assert parse_retry_after(b"99999999999999999999") == MAX_RETRY_AFTER
    date = b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert parse_retry_after(date, now=784111777.0 - 30) == 30.0
    assert parse_retry_after(date, now=784111777.0 + 30) == 0.0
    assert parse_retry_after(b"soon") is None
    assert parse_retry_after(None) is None


# -- the exchange over the network -----------------------------------------------------------


async def test_the_exchange_over_tls_checks_the_certificate(nursery: trio.Nursery) -> None:
    server_context, client_context = tls_contexts()
    with trio.fail_after(TEST_TIMEOUT):
        api = await start_pairing_api(nursery, "ws://relay/t", ssl_context=server_context)
        token, device = api.add_device()
        result = await exchange_pairing_token(api.url, token, ssl_context=client_context)
        assert result.device_token == device.device_token
        # The default context does not trust the self-signed certificate: no exchange.
        with pytest.raises(PairingUnavailable, match="could not reach"):
            await exchange_pairing_token(api.url, new_pairing_token())


async def test_no_answer_within_the_timeout_is_unavailable(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(TEST_TIMEOUT):
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(PairingUnavailable, match="no answer"):
            await exchange_pairing_token(f"http://127.0.0.1:{port}", TOKEN, timeout=0.2)


async def test_a_connection_failure_is_retried_with_backoff_until_cancelled() -> None:
    retries: list[tuple[int, PairingUnavailable, float]] = []
    with trio.fail_after(TEST_TIMEOUT), trio.CancelScope() as scope:

        def on_retry(attempt: int, error: PairingUnavailable, delay: float) -> None:
            retries.append((attempt, error, delay))
            if attempt == 3:
                scope.cancel()

        await pair_device(
            f"http://127.0.0.1:{closed_port()}",
            TOKEN,
            backoff_base=0.01,
            backoff_cap=0.02,
            on_retry=on_retry,
        )
    assert [(attempt, delay) for attempt, _, delay in retries] == [(1, 0.01), (2, 0.02), (3, 0.02)]
    assert all("could not reach the api-server" in str(error) for _, error, _ in retries)


async def test_a_503_is_retried_and_the_next_answer_is_used(nursery: trio.Nursery) -> None:
    retries: list[tuple[int, int | None]] = []
    with trio.fail_after(TEST_TIMEOUT):
        api = await start_pairing_api(nursery, "ws://relay/t")
        token, device = api.add_device()
        api.script.append(Canned(503, error_body("UNAVAILABLE", "starting")))
        result = await pair_device(
            api.url,
            token,
            backoff_base=0.01,
            on_retry=lambda attempt, error, delay: retries.append((attempt, error.status)),
        )
    assert result.device_token == device.device_token
    assert retries == [(1, 503)]
    assert len(api.requests) == 2


async def test_a_429_waits_the_retry_after_the_server_asked_for(nursery: trio.Nursery) -> None:
    delays: list[float] = []
    with trio.fail_after(TEST_TIMEOUT):
        api = await start_pairing_api(nursery, "ws://relay/t")
        token, device = api.add_device()
        api.script.append(Canned(429, error_body("RATE_LIMITED", "slow"), [("Retry-After", "1")]))
        started = trio.current_time()
        result = await pair_device(
            api.url,
            token,
            backoff_base=0.01,
            on_retry=lambda attempt, error, delay: delays.append(delay),
        )
        waited = trio.current_time() - started
    assert result.device_id == device.device_id
    assert delays == [1.0]  # not the backoff's 0.01
    assert waited >= 1.0


async def test_a_refused_token_is_not_retried(nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        api = await start_pairing_api(nursery, "ws://relay/t")
        with pytest.raises(PairingRefused):
            await pair_device(api.url, new_pairing_token(), backoff_base=0.01)
    assert len(api.requests) == 1


# -- the credentials file ---------------------------------------------------------------------


def credentials(relay_url: str = "ws://relay:3800/tunnel/connect") -> DeviceCredentials:
    return DeviceCredentials(
        device_id=DEVICE_ID,
        device_token=RELAY_TOKEN,
        relay_url=relay_url,
        api_url="http://127.0.0.1:3721",
        paired_at="2025-01-31T12:00:00Z",
    )


def test_the_default_credentials_path_follows_xdg_config_home() -> None:
    assert default_credentials_path({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path(
        "/x/visiona/agent.json"
    )
    for unset in ({"HOME": "/h"}, {"XDG_CONFIG_HOME": "", "HOME": "/h"}):
        assert default_credentials_path(unset) == Path("/h/.config/visiona/agent.json")
    relative = {"XDG_CONFIG_HOME": "cfg", "HOME": "/h"}  # the XDG spec: ignore a relative one
    assert default_credentials_path(relative) == Path("/h/.config/visiona/agent.json")


def test_stored_credentials_are_0600_in_new_0700_directories_and_load_back(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config" / "visiona" / "agent.json"
    store_credentials(path, credentials())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (path.parent, path.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {
        "device_id": DEVICE_ID,
        "device_token": RELAY_TOKEN,
        "relay_url": "ws://relay:3800/tunnel/connect",
        "api_url": "http://127.0.0.1:3721",
        "paired_at": "2025-01-31T12:00:00Z",
    }
    assert load_credentials(path) == credentials()
    assert os.listdir(path.parent) == ["agent.json"]  # no temporary file left


def test_a_failed_store_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agent.json"
    store_credentials(path, credentials())
    before = path.read_bytes()

    def failing_replace(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CredentialsError):
        store_credentials(path, credentials("ws://elsewhere/tunnel/connect"))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["agent.json"]


def test_no_credentials_file_is_none(tmp_path: Path) -> None:
    assert load_credentials(tmp_path / "agent.json") is None


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        json.dumps({**credentials().to_json(), "device_token": ""}).encode(),
        json.dumps({**credentials().to_json(), "relay_url": "http://relay/"}).encode(),
    ],
    ids=["not-json", "not-an-object", "empty-token", "relay-url-http"],
)
def test_a_credentials_file_that_is_not_valid_is_an_error_that_names_it(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "agent.json"
    path.write_bytes(content)
    with pytest.raises(CredentialsError, match="remove it and pair again") as raised:
        load_credentials(path)
    assert str(path) in str(raised.value)
    assert RELAY_TOKEN not in str(raised.value)


def test_credentials_keep_the_device_token_out_of_repr() -> None:
    assert RELAY_TOKEN not in repr(credentials())


# -- the client after unpairing ---------------------------------------------------------------


async def test_a_refused_device_token_logs_the_unpaired_hint_and_waits_the_cap_each_time(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="visiona_tunnel.agent")
    recorder = HookRecorder()
    recorded = recorder.hooks()
    hint = agent_module.unpaired_hint_hooks(Path("/creds.json"))

    def on_dial_failed(attempt: int, error: BaseException) -> None:
        assert hint.on_dial_failed is not None and recorded.on_dial_failed is not None
        hint.on_dial_failed(attempt, error)
        recorded.on_dial_failed(attempt, error)

    hooks = ClientHooks(
        on_dial_failed=on_dial_failed, on_retry_scheduled=recorded.on_retry_scheduled
    )
    config = ClientConfig(backoff_base=0.01, backoff_cap=0.05)
    with trio.fail_after(TEST_TIMEOUT):
        relay = await start_py_relay(nursery, {})  # the device was unpaired
        client = TunnelClient(relay.url, RELAY_TOKEN, ("127.0.0.1", 9), hooks=hooks, config=config)
        nursery.start_soon(client.run)
        for attempt in (1, 2, 3):
            _, number, error = await recorder.wait_for("dial_failed")
            assert (number, isinstance(error, TokenRefused)) == (attempt, True)
            assert await recorder.wait_for("retry_scheduled") == ("retry_scheduled", attempt, 0.05)
        client.stop()
    hints = [r for r in caplog.records if r.getMessage() == agent_module.UNPAIRED_HINT]
    assert len(hints) >= 3 and all(r.levelno == logging.WARNING for r in hints)
    assert len(hints) == recorder.count("dial_failed")  # once per refusal
    assert vars(hints[0])["credentials"] == "/creds.json"


def test_a_tunnel_client_for_a_relay_url_that_is_not_ws_is_refused_at_once() -> None:
    for url in ("http://relay:3800/tunnel/connect?token=sekrit", "ws:///tunnel/connect"):
        with pytest.raises(ValueError) as raised:
            TunnelClient(url, "sekrit", ("127.0.0.1", 9))
        assert "sekrit" not in str(raised.value)


# -- visiona-agent ----------------------------------------------------------------------------


@pytest.fixture
async def relay(nursery: trio.Nursery) -> PyRelay:
    return await start_py_relay(nursery, {})


@pytest.fixture
async def api(nursery: trio.Nursery, relay: PyRelay) -> PairingApi:
    return await start_pairing_api(nursery, relay.url)


def secrets_in(text: str, *secrets: str) -> list[str]:
    return [secret for secret in secrets if secret in text]


def is_one_line_and_exit_2(done: Finished, *secrets: str) -> None:
    assert done.returncode == 2, done
    assert len(done.stderr_lines) == 1, done.stderr
    assert done.stderr.startswith("visiona-agent: "), done.stderr
    assert "Traceback" not in done.stderr
    assert secrets_in(done.stdout + done.stderr, *secrets) == []


@pytest.fixture
async def paired_agent(
    nursery: trio.Nursery, relay: PyRelay, api: PairingApi, local: LocalServer, tmp_path: Path
) -> AsyncIterator[tuple[AgentProcess, str, Path]]:
    """An agent started with a pairing token and ``XDG_CONFIG_HOME`` in ``tmp_path``
    (so the default credentials path); yields it with the pairing token and that path."""
    token, device = api.add_device(DEVICE_ID)
    relay.tokens[device.device_token] = DEVICE_ID
    args = ["--api-url", api.url, "--pairing-token", token, "--local", local.address]
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    async with agent_process(nursery, args, env) as agent:
        yield agent, token, tmp_path / "config" / "visiona" / "agent.json"


async def test_the_first_start_pairs_stores_the_credentials_and_dials_the_relay(
    relay: PyRelay, api: PairingApi, paired_agent: tuple[AgentProcess, str, Path]
) -> None:
    agent, token, path = paired_agent
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        paired = await agent.wait_for(has_msg("paired"), timeout=START_TIMEOUT)
        await agent.wait_for(is_state("online"))
        tunnel = await relay.registry.wait_for(DEVICE_ID)
        agent.process.send_signal(signal.SIGTERM)
        assert await agent.wait_exit() == 0, agent.lines
    assert tunnel.key == DEVICE_ID
    assert api.used == {token} and len(api.requests) == 1
    device_token = next(k for k, v in relay.tokens.items() if v == DEVICE_ID)
    stored = json.loads(path.read_text())
    assert stored.keys() == {"device_id", "device_token", "relay_url", "api_url", "paired_at"}
    assert stored["device_id"] == DEVICE_ID
    assert stored["device_token"] == device_token
    assert stored["relay_url"] == relay.url
    assert stored["api_url"] == api.url
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stored["paired_at"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["agent.json"]
    assert paired["credentials"] == str(path)
    assert secrets_in(json.dumps(agent.lines), token, device_token) == []


async def test_a_later_start_uses_the_stored_credentials_without_an_exchange(
    nursery: trio.Nursery, relay: PyRelay, api: PairingApi, local: LocalServer, tmp_path: Path
) -> None:
    path = tmp_path / "agent.json"
    store_credentials(path, credentials(relay.url))
    relay.tokens[RELAY_TOKEN] = DEVICE_ID
    token, _ = api.add_device()  # given anyway: ignored
    args = ["--api-url", api.url, "--credentials", str(path), "--local", local.address]
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        async with agent_process(nursery, args, {"VISIONA_PAIRING_TOKEN": token}) as agent:
            ignored = await agent.wait_for(
                has_msg("the device is already paired: the pairing token is ignored"),
                timeout=START_TIMEOUT,
            )
            await agent.wait_for(is_state("online"))
            await relay.registry.wait_for(DEVICE_ID)
            agent.process.send_signal(signal.SIGINT)
            assert await agent.wait_exit() == 0, agent.lines
    assert ignored["device_id"] == DEVICE_ID
    assert api.requests == [] and token in api.pending
    assert load_credentials(path) == credentials(relay.url)  # not rewritten


@pytest.mark.parametrize(
    "refusal",
    [None, Canned(400, error_body("VALIDATION_ERROR", "token: required"))],
    ids=["401-unknown-token", "400"],
)
async def test_a_refused_pairing_token_exits_2_with_one_line_and_writes_nothing(
    api: PairingApi, local: LocalServer, tmp_path: Path, refusal: Canned | None
) -> None:
    if refusal is not None:
        api.script.append(refusal)
    token = new_pairing_token()  # unknown to the api-server: 401
    path = tmp_path / "agent.json"
    args = ["--api-url", api.url, "--credentials", str(path), "--local", local.address]
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        done = await run_agent_to_exit(args, {"VISIONA_PAIRING_TOKEN": token})
    is_one_line_and_exit_2(done, token)
    if refusal is None:
        assert done.stderr.startswith(
            "visiona-agent: the pairing token was refused (used, expired, revoked or unknown)"
        )
    else:
        assert "refused the pairing request (HTTP 400" in done.stderr
    assert len(api.requests) == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["flag", "environment"])
async def test_a_malformed_pairing_token_exits_2_before_any_request(
    api: PairingApi, local: LocalServer, tmp_path: Path, where: str
) -> None:
    token = "vAc_" + "ABCDEF0123456789" * 2  # upper case
    args = ["--api-url", api.url, "--credentials", str(tmp_path / "a.json")]
    args += ["--local", local.address]
    env: dict[str, str] = {}
    if where == "flag":
        args += ["--pairing-token", token]
    else:
        env["VISIONA_PAIRING_TOKEN"] = token
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        done = await run_agent_to_exit(args, env)
    is_one_line_and_exit_2(done, token)
    assert "32 lower-case hex digits" in done.stderr
    assert api.requests == []
    assert os.listdir(tmp_path) == []


async def test_the_agent_retries_the_exchange_after_a_503_and_then_dials(
    nursery: trio.Nursery, relay: PyRelay, api: PairingApi, local: LocalServer, tmp_path: Path
) -> None:
    token, device = api.add_device(DEVICE_ID)
    relay.tokens[device.device_token] = DEVICE_ID
    api.script.append(Canned(503, error_body("UNAVAILABLE", "starting")))
    path = tmp_path / "agent.json"
    args = ["--api-url", api.url, "--pairing-token", token, "--credentials", str(path)]
    args += ["--local", local.address, "--jitter", "0"]
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        async with agent_process(nursery, args) as agent:
            retry = await agent.wait_for(has_msg("pairing failed, will retry"), START_TIMEOUT)
            await agent.wait_for(has_msg("paired"))
            await relay.registry.wait_for(DEVICE_ID)
            agent.process.send_signal(signal.SIGTERM)
            assert await agent.wait_exit() == 0, agent.lines
    assert (retry["level"], retry["status"], retry["attempt"], retry["delay"]) == (
        "warning",
        503,
        1,
        1.0,
    )
    assert len(api.requests) == 2
    assert load_credentials(path) is not None


async def test_ctrl_c_while_the_exchange_is_retried_stops_cleanly_writing_nothing(
    nursery: trio.Nursery, api: PairingApi, local: LocalServer, tmp_path: Path
) -> None:
    token, _ = api.add_device()
    api.script.extend(Canned(503, error_body("UNAVAILABLE", "down")) for _ in range(50))
    path = tmp_path / "agent.json"
    args = ["--api-url", api.url, "--pairing-token", token, "--credentials", str(path)]
    args += ["--local", local.address]
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        async with agent_process(nursery, args) as agent:
            await agent.wait_for(has_msg("pairing failed, will retry"), START_TIMEOUT)
            agent.process.send_signal(signal.SIGINT)
            assert await agent.wait_exit() == 0, agent.lines
    assert [line.get("signal") for line in agent.lines if line.get("msg") == "stopping"] == [
        "SIGINT"
    ]
    assert all("unparsed" not in line for line in agent.lines), agent.lines
    assert os.listdir(tmp_path) == []


def is_unpaired_hint(line: LogLine) -> bool:
    return line.get("msg") == agent_module.UNPAIRED_HINT


async def test_a_relay_refusing_the_stored_token_logs_the_unpaired_hint_and_waits_the_cap(
    nursery: trio.Nursery, relay: PyRelay, local: LocalServer, tmp_path: Path
) -> None:
    path = tmp_path / "agent.json"
    store_credentials(path, credentials(relay.url))  # the relay does not know RELAY_TOKEN
    args = ["--credentials", str(path), "--local", local.address]
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        async with agent_process(nursery, args) as agent:
            hint = await agent.wait_for(is_unpaired_hint, START_TIMEOUT)
            retry = await agent.wait_for(has_msg("retry scheduled"))
            agent.process.send_signal(signal.SIGTERM)
            assert await agent.wait_exit() == 0, agent.lines
    assert (hint["level"], hint["status"], hint["credentials"]) == ("warning", 401, str(path))
    assert retry["delay"] == ClientConfig().backoff_cap  # straight to the cap, no jitter
    assert [line for line in agent.lines if is_unpaired_hint(line)] == [hint]
    assert secrets_in(json.dumps(agent.lines), RELAY_TOKEN) == []


# -- bad arguments: one line, exit 2 ---------------------------------------------------------


async def test_an_http_relay_url_is_one_line_and_exit_2_without_the_token() -> None:
    args = ["--relay-url", "http://127.0.0.1:9/tunnel/connect?x=1", "--token", "sekrit-token"]
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        done = await run_agent_to_exit([*args, "--local", "127.0.0.1:8080"])
    is_one_line_and_exit_2(done, "sekrit-token", "x=1")
    assert "ws://" in done.stderr


async def test_a_jitter_outside_0_to_1_is_one_line_and_exit_2() -> None:
    args = ["--relay-url", "ws://127.0.0.1:9/t", "--local", "127.0.0.1:8080", "--jitter", "5"]
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        done = await run_agent_to_exit(args, {"VISIONA_AGENT_TOKEN": "sekrit-token"})
    is_one_line_and_exit_2(done, "sekrit-token")
    assert "--jitter" in done.stderr


async def test_an_unknown_log_level_is_one_line_and_exit_2() -> None:
    args = ["--relay-url", "ws://127.0.0.1:9/t", "--local", "127.0.0.1:8080"]
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        done = await run_agent_to_exit(
            [*args, "--log-level", "loud"], {"VISIONA_AGENT_TOKEN": "sekrit-token"}
        )
    is_one_line_and_exit_2(done, "sekrit-token")
    assert "--log-level" in done.stderr and "debug, info, warning" in done.stderr


async def test_an_unknown_log_level_variable_is_one_line_and_exit_2_naming_it() -> None:
    args = ["--relay-url", "ws://127.0.0.1:9/t", "--local", "127.0.0.1:8080"]
    environ = {"VISIONA_AGENT_TOKEN": "sekrit-token", "VISIONA_LOG_LEVEL": "loud"}
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        done = await run_agent_to_exit(args, environ)
    is_one_line_and_exit_2(done, "sekrit-token")
    assert "VISIONA_LOG_LEVEL" in done.stderr and "--log-level" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "sekrit-token"], "--token needs --relay-url"),
        (["--pairing-token", TOKEN], "--pairing-token needs --api-url"),
        (["--api-url", "http://127.0.0.1:9"], "--api-url needs --pairing-token"),
        ([], "not paired yet"),
        (
            ["--relay-url", "ws://127.0.0.1:9/t", "--token", "t", "--pairing-token", TOKEN],
            "two ways to connect",
        ),
        (["--tokn=sekrit-token"], "unrecognized arguments: --tokn"),
    ],
    ids=["token-alone", "pairing-token-alone", "api-url-alone", "nothing", "both", "unknown"],
)
async def test_arguments_that_do_not_go_together_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    base = ["--credentials", str(tmp_path / "agent.json"), "--local", "127.0.0.1:8080"]
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        done = await run_agent_to_exit([*base, *args])
    is_one_line_and_exit_2(done, "sekrit-token", TOKEN)
    assert message in done.stderr
