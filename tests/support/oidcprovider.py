"""The dev identity provider (``devidp/provider.mjs``, npm ``oidc-provider``) for tests.

* ``start_oidc_provider``: runs it with node in a nursery, one client, on 127.0.0.1; the
  handle can ``restart`` it on the same port (new signing keys) and ``stop`` it.
* ``new_signing_jwks``: a fresh RSA signing key set for it, to rotate keys.
* ``login_at_provider`` / ``logout_at_provider`` (from ``examples.devbrowser``, which
  ``make run`` uses too): a browser (an ``httpx.AsyncClient`` with its cookie jar) driving
  the provider's development login, consent and logout pages.

Without node or ``devidp/node_modules`` the test is skipped (with ``CI=true``: failed); use
the ``devidp`` fixture (``tests/conftest.py``) so that the skip says why.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
from joserfc.jwk import RSAKey

from examples.devbrowser import ProviderFlowError, login_at_provider, logout_at_provider

from .missing import missing

__all__ = [
    "OidcProvider",
    "ProviderFailed",
    "ProviderFlowError",
    "RunningProvider",
    "login_at_provider",
    "logout_at_provider",
    "new_signing_jwks",
    "require_devidp",
    "start_oidc_provider",
]

DEVIDP_DIR = Path(__file__).resolve().parents[2] / "devidp"
PROVIDER_SCRIPT = DEVIDP_DIR / "provider.mjs"
INSTALL_HINT = "make devidp, or npm ci --prefix devidp; and apt-get install nodejs npm"
DEFAULT_CLIENT_ID = "visiona-web"
#: Upper bound for the provider process to print its ready line (it takes about 0.3 s).
START_TIMEOUT = 20.0
#: Node 20.12 brought the ``crypto.hash`` that oidc-provider 9 uses.
MIN_NODE = (20, 12)
READY_PREFIX = b"oidc-provider listening on "
#: Variables ``provider.mjs`` reads: never inherited from the test run's environment.
PROVIDER_VARIABLES = frozenset(
    {
        "PORT",
        "HOST",
        "ISSUER",
        "CLIENT_ID",
        "CLIENT_SECRET",
        "REDIRECT_URIS",
        "POST_LOGOUT_REDIRECT_URIS",
        "BACKCHANNEL_LOGOUT_URI",
        "JWKS_FILE",
        "ID_TOKEN_TTL",
        "COOKIE_KEY",
    }
)


class ProviderFailed(Exception):
    """The provider process did not start, or exited while it should have been running."""


@attrs.frozen
class OidcProvider:
    """One run of the provider: where it is and its one client."""

    issuer: str
    port: int
    client_id: str
    client_secret: str | None
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...] = ()
    backchannel_logout_uri: str | None = None
    #: ID token lifetime in seconds (``None``: oidc-provider's default, an hour).
    id_token_ttl: int | None = None

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"


@attrs.define(eq=False)
class RunningProvider:
    """A provider process run by ``start_oidc_provider``; ends with the nursery at the latest."""

    _nursery: trio.Nursery
    _node: str
    _settings: OidcProvider
    _scope: trio.CancelScope | None = None
    _exited: trio.Event | None = None

    @property
    def provider(self) -> OidcProvider:
        return self._settings

    @property
    def issuer(self) -> str:
        return self._settings.issuer

    @property
    def port(self) -> int:
        return self._settings.port

    @property
    def client_id(self) -> str:
        return self._settings.client_id

    @property
    def client_secret(self) -> str | None:
        return self._settings.client_secret

    @property
    def discovery_url(self) -> str:
        return self._settings.discovery_url

    async def restart(self, *, jwks: Mapping[str, Any] | None = None) -> None:
        """Stop the process and start a new one on the same port (same issuer), signing with
        ``jwks`` (``None``: a new generated key). The provider keeps its sessions, grants and
        codes in memory only: after a restart every browser has to log in again."""
        await self.stop()
        await self._start(self.port, jwks)

    async def stop(self) -> None:
        """Terminate the process (SIGTERM) and wait until it has exited."""
        if self._scope is not None and self._exited is not None:
            self._scope.cancel()
            await self._exited.wait()
        self._scope = self._exited = None

    async def _start(self, port: int, jwks: Mapping[str, Any] | None) -> None:
        settings = self._settings
        env = {k: v for k, v in os.environ.items() if k not in PROVIDER_VARIABLES}
        env |= {
            "PORT": str(port),
            "CLIENT_ID": settings.client_id,
            "REDIRECT_URIS": ",".join(settings.redirect_uris),
            "POST_LOGOUT_REDIRECT_URIS": ",".join(settings.post_logout_redirect_uris),
        }
        if settings.client_secret is not None:
            env["CLIENT_SECRET"] = settings.client_secret
        if settings.backchannel_logout_uri is not None:
            env["BACKCHANNEL_LOGOUT_URI"] = settings.backchannel_logout_uri
        if settings.id_token_ttl is not None:
            env["ID_TOKEN_TTL"] = str(settings.id_token_ttl)
        if settings.issuer:  # set once the first start has told the port
            env["ISSUER"] = settings.issuer
        keys_dir = tempfile.mkdtemp(prefix="devidp-")
        try:
            if jwks is not None:
                jwks_file = Path(keys_dir) / "jwks.json"
                await trio.Path(jwks_file).write_text(json.dumps(jwks))
                env["JWKS_FILE"] = str(jwks_file)
            command = [self._node, str(PROVIDER_SCRIPT)]
            self._scope, self._exited, issuer = await self._nursery.start(self._run, command, env)
        finally:
            shutil.rmtree(keys_dir)  # node reads the keys before it reports ready
        bound = urlsplit(issuer).port
        assert bound is not None, issuer
        self._settings = attrs.evolve(settings, issuer=issuer, port=bound)

    async def _run(
        self,
        command: list[str],
        env: dict[str, str],
        *,
        task_status: trio.TaskStatus[tuple[trio.CancelScope, trio.Event, str]],
    ) -> None:
        exited = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    # run_process terminates the process when cancelled (SIGTERM, then
                    # SIGKILL after 5 s); its stderr goes to ours, which pytest captures.
                    process: trio.Process = await nursery.start(
                        functools.partial(
                            trio.run_process,
                            command,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            check=False,
                        )
                    )
                    assert process.stdout is not None
                    with trio.fail_after(START_TIMEOUT):
                        issuer = await _ready_issuer(process.stdout)
                    task_status.started((scope, exited, issuer))
                    async for _ in process.stdout:  # keep the pipe drained: a full one blocks node
                        pass
                    code = await process.wait()
                    raise ProviderFailed(f"the oidc-provider at {issuer} exited with {code}")
        finally:
            exited.set()


async def _ready_issuer(stdout: trio.abc.ReceiveStream) -> str:
    """The issuer from the provider's ready line (what follows it on stdout is left)."""
    received = b""
    async for chunk in stdout:
        received += chunk
        for line in received.split(b"\n")[:-1]:
            if line.startswith(READY_PREFIX):
                return line.removeprefix(READY_PREFIX).decode().strip()
    raise ProviderFailed("the oidc-provider exited before it was ready (its stderr is above)")


@functools.cache
def _node_version(node: str) -> tuple[int, ...]:
    output = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    return tuple(int(part) for part in re.findall(r"\d+", output.stdout)[:3])


def require_devidp() -> str:
    """The node binary, or skip the test (with ``CI=true``: fail it) when node or the
    provider's modules are missing. ``start_oidc_provider`` checks too, but from a trio test a
    skip loses its reason (pytest-trio re-raises a bare skip): call this from a sync fixture
    first, as the ``devidp`` fixture of ``tests/conftest.py`` does."""
    node = shutil.which("node")
    if node is None:
        missing("the dev identity provider needs node, which is not on PATH", INSTALL_HINT)
    if _node_version(node) < MIN_NODE:
        found = ".".join(map(str, _node_version(node)))
        missing(f"the dev identity provider needs node >= 20.12, found {found}", INSTALL_HINT)
    if not (DEVIDP_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        missing(f"oidc-provider is not installed in {DEVIDP_DIR}/node_modules", INSTALL_HINT)
    return node


async def start_oidc_provider(
    nursery: trio.Nursery,
    *,
    redirect_uris: Sequence[str],
    backchannel_logout_uri: str | None = None,
    post_logout_redirect_uris: Sequence[str] = (),
    client_id: str = DEFAULT_CLIENT_ID,
    client_secret: str | None = None,
    jwks: Mapping[str, Any] | None = None,
    port: int | None = None,
    id_token_ttl: int | None = None,
) -> RunningProvider:
    """Start the dev provider on 127.0.0.1 (``port``, or a free one) in ``nursery``, with one
    client: public without ``client_secret``, else ``client_secret_basic``; PKCE (S256)
    required. It signs with ``jwks`` (private JWKs, see ``new_signing_jwks``) or a key of its
    own. Returns once it serves requests; the nursery's end terminates it."""
    settings = OidcProvider(
        issuer="",
        port=0,
        client_id=client_id,
        client_secret=client_secret,
        redirect_uris=tuple(redirect_uris),
        post_logout_redirect_uris=tuple(post_logout_redirect_uris),
        backchannel_logout_uri=backchannel_logout_uri,
        id_token_ttl=id_token_ttl,
    )
    running = RunningProvider(nursery, require_devidp(), settings)
    await running._start(port or 0, jwks)
    return running


def new_signing_jwks(kid: str) -> dict[str, Any]:
    """A fresh private RSA (2048) signing key set ``{"keys": [jwk]}`` for RS256."""
    key = RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS256", "use": "sig"})
    return {"keys": [dict(key.as_dict(private=True))]}
