"""Builds the Go yamux peer (``yamuxpeer/``) once per test run, offline, from Debian's sources.

Locally a missing toolchain skips the interop tests; with ``CI=true`` it fails them, so CI
can never go green without running them. ``.ci/run`` installs what is needed:
``golang-go golang-github-hashicorp-yamux-dev``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

INTEROP_DIR = Path(__file__).resolve().parent
PEER_SOURCE = INTEROP_DIR / "yamuxpeer"
BUILD_DIR = INTEROP_DIR / ".build"
#: Debian's golang-github-hashicorp-yamux-dev (snapshot df201c7); yamuxpeer/go.mod points here.
YAMUX_SOURCE = Path("/usr/share/gocode/src/github.com/hashicorp/yamux")
INSTALL_HINT = "apt-get install golang-go golang-github-hashicorp-yamux-dev"


def _toolchain_missing(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the interop toolchain is missing: {reason} ({INSTALL_HINT})")
    pytest.skip(f"interop tests need Go and Debian's yamux sources: {reason} ({INSTALL_HINT})")


@pytest.fixture(scope="session")
def yamuxpeer() -> Path:
    """Path to the built Go peer binary."""
    go = shutil.which("go")
    if go is None:
        _toolchain_missing("no `go` on PATH")
    if not (YAMUX_SOURCE / "session.go").is_file():
        _toolchain_missing(f"no hashicorp/yamux sources in {YAMUX_SOURCE}")
    binary = BUILD_DIR / "yamuxpeer"
    env = {
        **os.environ,
        # Offline: every module comes from go.mod's `replace` onto Debian's sources.
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOSUMDB": "off",
        "GOWORK": "off",
        "GOTOOLCHAIN": "local",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
        "GOCACHE": str(BUILD_DIR / "gocache"),
        "GOPATH": str(BUILD_DIR / "gopath"),
    }
    result = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=PEER_SOURCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"building {PEER_SOURCE} failed:\n{result.stdout}{result.stderr}")
    return binary
