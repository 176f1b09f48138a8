"""Token verifiers: the static table, the api-server client against a fake api-server
(the contract in docs/remote-proxy.md), and which one the configuration picks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from support.tunnelhttp import closed_port

from visiona_services.common.envconfig import ConfigError
from visiona_services.remote_proxy.config import ProxyConfig
from visiona_services.remote_proxy.verify import (
    ApiServerVerifier,
    StaticTokenVerifier,
    VerifierUnavailable,
    verifier_from_config,
)

from .fakeapi import FakeApiServer, start_fake_api_server

SECRET = "internal-secret"
#: Upper bound for one test body.
TEST_TIMEOUT = 10.0


@pytest.fixture
async def api(nursery: trio.Nursery) -> FakeApiServer:
    return await start_fake_api_server(nursery)


@pytest.fixture
async def verifier(api: FakeApiServer) -> AsyncIterator[ApiServerVerifier]:
    async with ApiServerVerifier(api.url, SECRET) as verifier:
        yield verifier


# -- StaticTokenVerifier ------------------------------------------------------------------


async def test_static_known_token_gives_its_device() -> None:
    assert await StaticTokenVerifier({"tok": "dev-1"})("tok") == "dev-1"


async def test_static_unknown_token_gives_none() -> None:
    assert await StaticTokenVerifier({"tok": "dev-1"})("other") is None


def test_static_repr_hides_tokens() -> None:
    assert "s3cret" not in repr(StaticTokenVerifier({"s3cret": "dev-1"}))


# -- ApiServerVerifier --------------------------------------------------------------------


async def test_api_valid_token_gives_device_id(verifier: ApiServerVerifier) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert await verifier("good-7") == "dev-7"


async def test_api_request_follows_the_contract(
    api: FakeApiServer, verifier: ApiServerVerifier
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await verifier("good-7")
    [seen] = api.requests
    assert (seen.method, seen.path) == ("POST", "/internal/devices/verify")
    assert seen.headers[b"authorization"] == f"Bearer {SECRET}".encode()
    assert seen.headers[b"content-type"] == b"application/json"
    assert json.loads(seen.body) == {"token": "good-7"}


async def test_api_base_url_path_is_a_prefix(api: FakeApiServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ApiServerVerifier(api.url + "/api/", SECRET) as verifier:
            await verifier("good-1")
    assert api.requests[0].path == "/api/internal/devices/verify"


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_api_refusal_gives_none(verifier: ApiServerVerifier, status: int) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert await verifier(f"status-{status}") is None


@pytest.mark.parametrize("status", [400, 500, 502, 503])
async def test_api_other_status_is_unavailable(verifier: ApiServerVerifier, status: int) -> None:
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(VerifierUnavailable):
        await verifier(f"status-{status}")


async def test_api_malformed_answer_is_unavailable(verifier: ApiServerVerifier) -> None:
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(VerifierUnavailable):
        await verifier("garbled")


async def test_api_no_answer_in_time_is_unavailable(api: FakeApiServer) -> None:
    async with ApiServerVerifier(api.url, SECRET, timeout=0.2) as verifier:
        with trio.fail_after(TEST_TIMEOUT), pytest.raises(VerifierUnavailable):
            await verifier("slow")


async def test_api_unreachable_is_unavailable() -> None:
    async with ApiServerVerifier(f"http://127.0.0.1:{closed_port()}", SECRET) as verifier:
        with trio.fail_after(TEST_TIMEOUT), pytest.raises(VerifierUnavailable):
            await verifier("good-1")


async def test_api_checks_reuse_kept_alive_connections(
    api: FakeApiServer, verifier: ApiServerVerifier
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        for n in range(5):
            assert await verifier(f"good-{n}") == f"dev-{n}"
    assert len({seen.client for seen in api.requests}) == 1


async def test_api_checks_at_once_share_a_bounded_number_of_connections(
    api: FakeApiServer,
) -> None:
    async with ApiServerVerifier(api.url, SECRET, max_connections=2) as verifier:
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for n in range(20):
                    nursery.start_soon(verifier, f"good-{n}")
    assert len(api.requests) == 20
    assert api.most_at_once <= 2
    assert len({seen.client for seen in api.requests}) <= 2


BAD_API_URLS = [
    "https://api.internal",
    "api.internal:80",
    "http://h/?q=1",
    "http://api:99999",
    "http://api:port",
    "http://api:0",
    "http://user:pw@api",
    "http://api/my prefix",
]


@pytest.mark.parametrize("url", BAD_API_URLS)
def test_api_url_must_be_plain_http(url: str) -> None:
    with pytest.raises(ValueError):
        ApiServerVerifier(url, SECRET)


@pytest.mark.parametrize("url", BAD_API_URLS)
def test_a_bad_api_url_fails_the_config_naming_the_variable(url: str) -> None:
    environ = {"VISIONA_API_INTERNAL_URL": url, "VISIONA_INTERNAL_SECRET": SECRET}
    with pytest.raises(ConfigError, match=r"\bVISIONA_API_INTERNAL_URL: "):
        ProxyConfig.from_env(environ)


@pytest.mark.parametrize(
    ("url", "host", "port", "target"),
    [
        ("http://api.internal", "api.internal", 80, "/internal/devices/verify"),
        ("http://[::1]:3721/v1/", "::1", 3721, "/v1/internal/devices/verify"),
        ("http://api:8080/a%20b", "api", 8080, "/a%20b/internal/devices/verify"),
    ],
)
def test_api_url_parts(url: str, host: str, port: int, target: str) -> None:
    verifier = ApiServerVerifier(url, SECRET)
    assert (verifier.host, verifier.port, verifier.target) == (host, port, target)


def test_api_repr_hides_the_secret() -> None:
    assert SECRET not in repr(ApiServerVerifier("http://api.internal:8080", SECRET))


# -- verifier_from_config -----------------------------------------------------------------


def test_config_with_api_url_asks_the_api_server() -> None:
    config = ProxyConfig(api_internal_url="http://api:3721", internal_secret=SECRET)
    verifier = verifier_from_config(config)
    assert isinstance(verifier, ApiServerVerifier)
    assert (verifier.host, verifier.port) == ("api", 3721)


def write_tokens(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


async def test_static_tokens_come_from_a_file_too_beyond_what_a_variable_holds(
    tmp_path: Path,
) -> None:
    lines = [f"token-{n:05d}-{'x' * 40}=device-{n}" for n in range(10_000)]  # ~600 KB
    path = write_tokens(tmp_path, "# devices\n\n" + "\n".join(lines) + "\n")
    config = ProxyConfig.from_env(
        {
            "VISIONA_INTERNAL_SECRET": SECRET,
            "VISIONA_PROXY_STATIC_TOKENS": "env-token=device-env",
            "VISIONA_PROXY_STATIC_TOKENS_FILE": path,
        }
    )
    verifier = verifier_from_config(config)
    assert await verifier(f"token-09999-{'x' * 40}") == "device-9999"
    assert await verifier("env-token") == "device-env"
    assert await verifier("# devices") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("good=device-1\nsecret-token-without-device\n", "line 2: expected token=device"),
        ("secret-token=device-1\nsecret-token=device-2\n", "line 2: this token is given twice"),
        ("env-token=device-3\n", "a token is in both"),
    ],
)
def test_a_bad_tokens_file_is_refused_at_start_without_showing_a_token(
    tmp_path: Path, text: str, message: str
) -> None:
    environ = {
        "VISIONA_INTERNAL_SECRET": SECRET,
        "VISIONA_PROXY_STATIC_TOKENS": "env-token=device-env",
        "VISIONA_PROXY_STATIC_TOKENS_FILE": write_tokens(tmp_path, text),
    }
    with pytest.raises(ConfigError, match=message) as caught:
        ProxyConfig.from_env(environ)
    assert "secret-token" not in str(caught.value) and "env-token" not in str(caught.value)


async def test_config_without_api_url_uses_static_tokens() -> None:
    config = ProxyConfig(static_tokens="tok=dev-1", internal_secret=SECRET)
    verifier = verifier_from_config(config)
    assert isinstance(verifier, StaticTokenVerifier)
    assert await verifier("tok") == "dev-1"
