"""``ApiConfig.from_env``: defaults, bad values named, secrets refused or generated."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from visiona_services.api_server.config import ApiConfig, ConfigError
from visiona_services.api_server.ratelimit import client_key

STRONG = "x7Gq2-strong-secret-value-0123456789abcdef"
GOOD = {
    "VISIONA_SESSION_SECRET": STRONG,
    "VISIONA_INTERNAL_SECRET": STRONG + "2",
    "VISIONA_STORAGE_SIGNING_SECRET": STRONG + "3",
}


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    config, generated = ApiConfig.from_env({**GOOD, "VISIONA_DATA_DIR": str(tmp_path)})
    assert generated == {}
    assert (config.host, config.port) == ("127.0.0.1", 3721)
    assert config.public_url == "http://127.0.0.1:3721"
    assert config.redirect_uri == "http://127.0.0.1:3721/api/auth/callback"
    assert config.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'visiona.db'}"
    assert config.proxy_internal_url == "http://127.0.0.1:3801"
    assert config.oidc_scopes == "openid email profile"
    assert config.environment == "production" and not config.secure_cookies


def test_cookies_are_secure_exactly_when_the_public_url_is_https() -> None:
    config, _ = ApiConfig.from_env({**GOOD, "VISIONA_PUBLIC_URL": "https://app.example.com/"})
    assert config.secure_cookies
    assert config.redirect_uri == "https://app.example.com/api/auth/callback"


@pytest.mark.parametrize(
    "variable, value",
    [
        ("VISIONA_API_PORT", "70000"),
        ("VISIONA_API_PORT", "http"),
        ("VISIONA_PUBLIC_URL", "ftp://x"),
        ("VISIONA_PUBLIC_URL", "http://host/with/path"),
        ("VISIONA_PROXY_INTERNAL_URL", "localhost:3801"),
        ("VISIONA_CORS_ALLOWED_ORIGINS", "http://ok.test,not an origin"),
        ("VISIONA_CORS_ALLOWED_ORIGINS", "http://ok.test/path"),
        ("VISIONA_OIDC_SCOPES", "email profile"),
        ("VISIONA_LOG_LEVEL", "loud"),
        ("VISIONA_ENV", "staging"),
        ("VISIONA_SESSION_IDLE_TIMEOUT", "-1"),
        ("VISIONA_RATE_LIMIT_LOGIN", "lots"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        ApiConfig.from_env({**GOOD, variable: value})


@pytest.mark.parametrize("variable", ["VISIONA_SESSION_SECRET", "VISIONA_INTERNAL_SECRET"])
@pytest.mark.parametrize(
    "value", ["", "changeme", "short", "dev-signing-secret-0123456789abcdefgh"]
)
def test_production_refuses_missing_or_known_secrets(variable: str, value: str) -> None:
    environ = {**GOOD, variable: value}
    with pytest.raises(ConfigError, match=variable):
        ApiConfig.from_env(environ)


def test_production_refuses_one_secret_for_both_uses() -> None:
    with pytest.raises(ConfigError, match="must all differ"):
        ApiConfig.from_env({**GOOD, "VISIONA_INTERNAL_SECRET": STRONG})


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    config, _ = ApiConfig.from_env({**GOOD, "VISIONA_TRUSTED_PROXIES": "10.0.0.0/8, ::1"})
    assert len(config.trusted_proxy_networks) == 2
    with pytest.raises(ConfigError, match="VISIONA_TRUSTED_PROXIES"):
        ApiConfig.from_env({**GOOD, "VISIONA_TRUSTED_PROXIES": "proxy.local"})


def test_dev_generates_missing_secrets_keeps_them_private_and_reuses_them(tmp_path: Path) -> None:
    environ = {"VISIONA_ENV": "dev", "VISIONA_DATA_DIR": str(tmp_path)}
    config, generated = ApiConfig.from_env(environ)
    assert set(generated) == {
        "VISIONA_SESSION_SECRET",
        "VISIONA_INTERNAL_SECRET",
        "VISIONA_STORAGE_SIGNING_SECRET",
    }
    assert config.session_secret == generated["VISIONA_SESSION_SECRET"]
    assert len(config.session_secret) >= 32
    kept = tmp_path / "dev-secrets.env"
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
    os.chmod(kept, 0o644)
    ApiConfig.from_env({**environ, "VISIONA_INTERNAL_SECRET": ""})
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
    again, _ = ApiConfig.from_env(environ)
    assert again.session_secret == config.session_secret  # a restart keeps sessions


def test_serving_needs_an_issuer_and_a_client_id() -> None:
    config, _ = ApiConfig.from_env(GOOD)
    with pytest.raises(ConfigError, match="VISIONA_OIDC_ISSUER"):
        config.require_oidc()
    config, _ = ApiConfig.from_env({**GOOD, "VISIONA_OIDC_ISSUER": "http://idp.test"})
    with pytest.raises(ConfigError, match="VISIONA_OIDC_CLIENT_ID"):
        config.require_oidc()


def test_secrets_never_show_in_the_repr() -> None:
    config, _ = ApiConfig.from_env({**GOOD, "VISIONA_OIDC_CLIENT_SECRET": "client-secret-xyz"})
    assert STRONG not in repr(config) and "client-secret-xyz" not in repr(config)


@pytest.mark.parametrize(
    "address, key",
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
    ],
)
def test_rate_limits_key_ipv6_clients_by_their_64(address: str, key: str) -> None:
    assert client_key(address) == key
