"""Builds the Go interop peers once per test run, offline, from Debian's sources.

* ``yamuxpeer`` (``yamuxpeer/``): a hashicorp/yamux peer over plain TCP.
* ``tunnel_peers`` (``tunnelpeers/``): the Go tunnel agent and relay (see ``tunnelpeers.py``).

Locally a missing toolchain skips the interop tests; with ``CI=true`` it fails them, so CI
can never go green without running them. ``.ci/run`` installs what is needed:
``golang-go golang-github-hashicorp-yamux-dev golang-github-gorilla-websocket-dev``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

from .gobuild import (
    BUILD_DIR,
    INTEROP_DIR,
    YAMUX_SOURCE,
    GoBuildFailed,
    GoToolchainMissing,
    go_build,
)
from .tunnelpeers import TunnelPeerBinaries, build_tunnel_peers

PEER_SOURCE = INTEROP_DIR / "yamuxpeer"
INSTALL_HINT = (
    "apt-get install golang-go golang-github-hashicorp-yamux-dev "
    "golang-github-gorilla-websocket-dev"
)


def _toolchain_missing(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the interop toolchain is missing: {reason} ({INSTALL_HINT})")
    pytest.skip(f"interop tests need Go and Debian's Go sources: {reason} ({INSTALL_HINT})")


@pytest.fixture(scope="session")
def yamuxpeer() -> Path:
    """Path to the built Go peer binary."""
    binary = BUILD_DIR / "yamuxpeer"
    try:
        go_build(PEER_SOURCE, binary, required_sources=[YAMUX_SOURCE])
    except GoToolchainMissing as exc:
        _toolchain_missing(str(exc))
    except GoBuildFailed as exc:
        pytest.fail(str(exc))
    return binary


@pytest.fixture(scope="session")
def tunnel_peers() -> TunnelPeerBinaries:
    """Paths to the built Go tunnel agent (``goagent``) and relay (``gorelay``)."""
    try:
        return build_tunnel_peers()
    except GoToolchainMissing as exc:
        _toolchain_missing(str(exc))
    except GoBuildFailed as exc:
        pytest.fail(str(exc))
