"""Build the Go interop peers offline, from Debian's packaged Go sources.

Every module comes from a ``replace`` line in the peer's ``go.mod`` onto
``/usr/share/gocode/src``; nothing is downloaded (``GOPROXY=off``). The Go build and
module caches live in ``tests/interop/.build`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

INTEROP_DIR = Path(__file__).resolve().parent
BUILD_DIR = INTEROP_DIR / ".build"
#: Debian's golang-github-hashicorp-yamux-dev (snapshot df201c7).
YAMUX_SOURCE = Path("/usr/share/gocode/src/github.com/hashicorp/yamux")
#: Debian's golang-github-gorilla-websocket-dev (1.5.0).
GORILLA_SOURCE = Path("/usr/share/gocode/src/github.com/gorilla/websocket")


class GoToolchainMissing(Exception):
    """Go, or a Debian Go source package a peer needs, is not installed."""


class GoBuildFailed(Exception):
    """``go build`` failed; the message holds its output."""


def go_env(build_dir: Path = BUILD_DIR) -> dict[str, str]:
    """The environment for an offline build with caches inside ``build_dir``."""
    return {
        **os.environ,
        # Offline: every module comes from go.mod's `replace` onto Debian's sources.
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOSUMDB": "off",
        "GOWORK": "off",
        "GOTOOLCHAIN": "local",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
        "GOCACHE": str(build_dir / "gocache"),
        "GOPATH": str(build_dir / "gopath"),
    }


def find_go(required_sources: Sequence[Path] = ()) -> str:
    """The ``go`` binary; raise :class:`GoToolchainMissing` if it or a source is missing."""
    go = shutil.which("go")
    if go is None:
        raise GoToolchainMissing("no `go` on PATH")
    for source in required_sources:
        if not source.is_dir() or not any(source.glob("*.go")):
            raise GoToolchainMissing(f"no Go sources in {source}")
    return go


def go_build(
    source: Path,
    output: Path,
    packages: Sequence[str] = (".",),
    *,
    required_sources: Sequence[Path] = (),
    build_dir: Path = BUILD_DIR,
) -> None:
    """``go build -o output packages`` in ``source``, offline.

    With more than one package, ``output`` is a directory that receives one binary per
    main package.
    """
    go = find_go(required_sources)
    target = str(output)
    if len(packages) > 1 or any(p.endswith("...") for p in packages):
        output.mkdir(parents=True, exist_ok=True)
        target += os.sep
    result = subprocess.run(
        [go, "build", "-o", target, *packages],
        cwd=source,
        env=go_env(build_dir),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise GoBuildFailed(f"building {source} failed:\n{result.stdout}{result.stderr}")
