"""LocalFSStore: objects as files under a root directory (docs/storage.md, "LocalFS").

On disk, the object at key ``a/b/c`` is the one file ``{root}/a/b/c@``: the object's bytes,
then its metadata as JSON, then a 12-byte tail (the JSON's length, big-endian u32, and the
magic ``VSOBJv1\\n``). The ``@`` (outside the key alphabet) keeps ``a/b`` the object and
``a/b/`` the directory apart, as S3 allows both.

An upload is written to ``{root}/.tmp/<random>.part`` (same filesystem), the metadata
appended once the bytes are complete and checked, fsynced, renamed over ``a/b/c@`` and the
directory fsynced. Object and metadata are one file and change by one rename, so a reader
sees the old object or the new one, whole, with its own metadata; a failed, cancelled or
killed upload leaves at most a ``.part`` file (``remove_stale_temp``), never an object.

Every path is walked from the root one directory at a time with ``O_NOFOLLOW`` (``openat``
on the directory descriptors): a symlink anywhere below the root is refused, whatever
changes on disk meanwhile. Blocking calls run in worker threads (a ``CapacityLimiter``);
a read of bytes the page cache holds is a copy from memory, done in the event loop
(``preadv`` with ``RWF_NOWAIT``, which never waits for the disk).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import stat as stat_module
import struct
import time
from collections.abc import AsyncIterable, Callable, Generator, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import trio

from visiona_tunnel.tasks import ungrouped

from .base import (
    ByteRange,
    InvalidKey,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectReader,
    ObjectSummary,
    PresignedUrl,
    Store,
    StoreError,
    StoreUnavailable,
    metered_blocks,
    validate_key,
)
from .signing import SignedRequest, UrlSigner

__all__ = ["OBJECT_SUFFIX", "TEMP_DIR", "LocalFSStore"]

logger = logging.getLogger(__name__)

#: The object at key ``k`` is the file ``{root}/k@``.
OBJECT_SUFFIX = "@"
#: Uploads in progress, under the root (no key can start with a dot).
TEMP_DIR = ".tmp"
MAGIC = b"VSOBJv1\n"
_TAIL = struct.Struct(">I8s")
#: The metadata JSON is at most this long (the key rules keep it near 2.5 KiB).
MAX_META_JSON = 64 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
#: An upload's written bytes are fdatasynced every this many, while it goes on.
SYNC_AHEAD = 32 * 1024 * 1024
#: ``preadv`` flag: read only what is in the page cache, never wait for the disk (Linux).
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_SAFE_DIR_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_T = TypeVar("_T")


class _Temp:
    """An upload's temporary file: its name in ``.tmp`` and its descriptor (-1 once
    closed, so it is never closed twice)."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.renamed = False

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class LocalFSStore(Store):
    """Objects under ``root`` (created if missing; the api-server passes
    ``{VISIONA_DATA_DIR}/objects``). Presigned URLs are tokens signed with
    ``signing_secret`` (at least 32 bytes) that the api-server's ``/storage/`` route checks
    with ``verify_signed_url``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        signing_secret: str | bytes,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        threads: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 4096 <= chunk_size <= 16 * 1024 * 1024:
            raise ValueError("chunk_size is 4 KiB .. 16 MiB")
        path = Path(root)
        path.mkdir(mode=0o750, parents=True, exist_ok=True)
        # The root itself is the operator's: resolved once; below it no symlink is followed.
        self.root = path.resolve(strict=True)
        (self.root / TEMP_DIR).mkdir(mode=0o700, exist_ok=True)
        if (self.root / TEMP_DIR).is_symlink():
            raise ValueError(f"{self.root / TEMP_DIR} is a symlink")
        self._signer = UrlSigner(signing_secret)
        self._chunk_size = chunk_size
        self._limiter = trio.CapacityLimiter(threads)
        self._clock = clock
        #: Page-cache reads in the event loop (``RWF_NOWAIT``); off once refused.
        self._nowait_reads = _NOWAIT is not None

    def __repr__(self) -> str:
        return f"LocalFSStore({str(self.root)!r})"

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread; OS errors become ``StoreUnavailable``."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except OSError as exc:
            raise StoreUnavailable(f"local storage: {exc.strerror or exc}") from exc

    # -- signed URLs --

    def verify_signed_url(self, token: str, method: str, now: float | None = None) -> SignedRequest:
        """What the token of a ``/storage/{token}`` URL allows: ``SignatureInvalid`` (403
        ``SIGNATURE_INVALID``) or ``UrlExpired`` (403 ``URL_EXPIRED``) otherwise."""
        return self._signer.verify(token, method, self._clock() if now is None else now)

    async def _presigned_get_url(self, key: str, ttl: int, public_url: str) -> PresignedUrl:
        expires = int(self._clock()) + ttl
        token = self._signer.sign("GET", key, expires)
        return PresignedUrl(
            _url(public_url, token), "GET", {}, datetime.fromtimestamp(expires, UTC)
        )

    async def _presigned_put_url(
        self, key: str, ttl: int, size: int, content_type: str, public_url: str
    ) -> PresignedUrl:
        expires = int(self._clock()) + ttl
        token = self._signer.sign("PUT", key, expires, max_size=size, content_type=content_type)
        return PresignedUrl(
            _url(public_url, token),
            "PUT",
            {"content-type": content_type},
            datetime.fromtimestamp(expires, UTC),
        )

    # -- objects --

    async def _put(
        self,
        key: str,
        stream: AsyncIterable[bytes],
        size: int | None,
        limit: int | None,
        content_type: str,
        metadata: dict[str, str],
    ) -> ObjectInfo:
        digest = hashlib.sha256()
        temp = await self._run(self._create_temp)
        try:
            received = 0
            # A pipeline: the next block is read from the stream (the network, for a route)
            # while this one is hashed, then written, by one worker thread (hashlib and
            # os.write release the GIL). One thread hop and one hash call per block: hops
            # and GIL hand-offs cost more than a copy (measured: hashing and writing in two
            # threads at once, or hashing the stream's chunks unjoined, upload slower).
            # At most three blocks are in memory. Every SYNC_AHEAD bytes written, an
            # fdatasync starts in another thread (one at a time): the disk writes while the
            # rest arrives, and the final fsync has little left to do.
            send, receive = trio.open_memory_channel[bytes](1)

            def hash_and_write(block: bytes) -> None:
                digest.update(block)
                _write_all(temp.fd, block)

            async def write_blocks(nursery: trio.Nursery) -> None:
                written = synced = 0
                syncing = trio.Event()
                syncing.set()
                async with receive:
                    async for block in receive:
                        await self._run(hash_and_write, block)
                        written += len(block)
                        if written - synced >= SYNC_AHEAD and syncing.is_set():
                            synced, syncing = written, trio.Event()
                            nursery.start_soon(self._sync_ahead, temp.fd, syncing)

            blocks = metered_blocks(stream, size, limit, self._chunk_size)
            with ungrouped():  # a Store raises its own errors, not a group
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(write_blocks, nursery)
                    async with send, aclosing(blocks):
                        async for block in blocks:
                            received += len(block)
                            await send.send(block)
            meta = {
                "v": 1,
                "size": received,
                "sha256": digest.hexdigest(),
                "content_type": content_type,
                "metadata": metadata,
            }
            return await self._run(self._commit, temp, key, meta)
        finally:
            if not temp.renamed or temp.fd >= 0:
                with trio.CancelScope(shield=True):
                    try:
                        await self._run(self._discard, temp)
                    except StoreError as exc:  # never hides why the upload failed
                        logger.warning("could not remove %s/%s: %s", TEMP_DIR, temp.name, exc)

    async def _sync_ahead(self, fd: int, done: trio.Event) -> None:
        try:
            await self._run(os.fdatasync, fd)
        finally:
            done.set()

    async def _get(self, key: str, range: ByteRange | None) -> ObjectReader:
        fd, info = await self._run(self._open_object, key)
        try:
            span = None if range is None else range.resolve(info.size)
        except BaseException:
            os.close(fd)
            raise
        return _LocalReader(self, fd, info, span)

    async def _stat(self, key: str) -> ObjectInfo:
        fd, info = await self._run(self._open_object, key)
        os.close(fd)
        return info

    async def _delete(self, key: str) -> None:
        await self._run(self._delete_sync, key)

    async def _list(self, prefix: str, after: str | None, limit: int) -> ListPage:
        return await self._run(self._list_sync, prefix, after, limit)

    async def remove_stale_temp(self, older_than: float = 24 * 3600) -> int:
        """Removes the ``.tmp`` files of uploads that a crash left behind (not touched for
        ``older_than`` seconds); returns how many. Never needed for correctness: such files
        are never objects."""
        return await self._run(self._remove_stale_temp, older_than)

    # -- the blocking parts (worker threads) --

    def _open_root(self) -> int:
        return os.open(self.root, _DIR_FLAGS)

    def _open_dirs(self, key: str, names: Sequence[str], create: bool) -> list[int]:
        """Descriptors of the root and of each directory ``names`` leads to, walked without
        following symlinks (created when ``create``); the caller closes them."""
        fds = [self._open_root()]
        try:
            for name in names:
                fds.append(_open_dir(fds[-1], name, key, create))
        except BaseException:
            _close_all(fds)
            raise
        return fds

    def _create_temp(self) -> _Temp:
        root = self._open_root()
        try:
            tmp_dir = _open_dir(root, TEMP_DIR, TEMP_DIR, create=True)
        finally:
            os.close(root)
        try:
            name = f"{secrets.token_hex(16)}.part"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return _Temp(name, os.open(name, flags, 0o640, dir_fd=tmp_dir))
        finally:
            os.close(tmp_dir)

    def _discard(self, temp: _Temp) -> None:
        temp.close()
        if temp.renamed:
            return
        root = self._open_root()
        try:
            tmp_dir = _open_dir(root, TEMP_DIR, TEMP_DIR, create=False)
            try:
                os.unlink(temp.name, dir_fd=tmp_dir)
            except FileNotFoundError:
                pass
            finally:
                os.close(tmp_dir)
        except ObjectNotFound:
            pass
        finally:
            os.close(root)

    def _commit(self, temp: _Temp, key: str, meta: dict[str, Any]) -> ObjectInfo:
        """Appends the metadata, makes the file durable and renames it into place."""
        raw = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode("ascii")
        _write_all(temp.fd, raw + _TAIL.pack(len(raw), MAGIC))
        os.fsync(temp.fd)
        st = os.fstat(temp.fd)
        segments = key.split("/")
        name = segments[-1] + OBJECT_SUFFIX
        # A concurrent delete may remove a directory we walked (when it left it empty):
        # the rename then finds no directory, and we walk (and create) again.
        for _ in range(8):
            fds = self._open_dirs(key, segments[:-1], create=True)
            try:
                parent = fds[-1]
                _refuse_unsafe_final(parent, name, key)
                tmp_dir = _open_dir(fds[0], TEMP_DIR, TEMP_DIR, create=False)
                try:
                    os.rename(temp.name, name, src_dir_fd=tmp_dir, dst_dir_fd=parent)
                except FileNotFoundError:
                    if _exists(tmp_dir, temp.name):
                        continue
                    raise StoreUnavailable("the upload's temporary file vanished") from None
                finally:
                    os.close(tmp_dir)
                temp.renamed = True
                os.fsync(parent)
                break
            finally:
                _close_all(fds)
        else:
            raise StoreUnavailable(f"could not place {key!r}: its directories kept vanishing")
        temp.close()
        return ObjectInfo(
            key=key,
            size=meta["size"],
            etag=meta["sha256"],
            content_type=meta["content_type"],
            metadata=dict(meta["metadata"]),
            sha256=meta["sha256"],
            last_modified=_mtime(st),
        )

    def _open_object(self, key: str) -> tuple[int, ObjectInfo]:
        segments = key.split("/")
        fds = self._open_dirs(key, segments[:-1], create=False)
        try:
            fd = _open_file(fds[-1], segments[-1] + OBJECT_SUFFIX, key)
        finally:
            _close_all(fds)
        try:
            return fd, _read_info(fd, key)
        except BaseException:
            os.close(fd)
            raise

    def _delete_sync(self, key: str) -> None:
        segments = key.split("/")
        try:
            fds = self._open_dirs(key, segments[:-1], create=False)
        except ObjectNotFound:
            return
        try:
            name = segments[-1] + OBJECT_SUFFIX
            try:
                _refuse_unsafe_final(fds[-1], name, key)
                os.unlink(name, dir_fd=fds[-1])
            except FileNotFoundError:
                return
            os.fsync(fds[-1])
            # Directories the delete left empty go too, deepest first (best effort).
            for depth in range(len(segments) - 1, 0, -1):
                try:
                    os.rmdir(segments[depth - 1], dir_fd=fds[depth - 1])
                except OSError:
                    break
        finally:
            _close_all(fds)

    def _list_sync(self, prefix: str, after: str | None, limit: int) -> ListPage:
        items: list[ObjectSummary] = []
        root = self._open_root()
        try:
            walk = _walk(root, "", prefix, after)
            try:
                for key, parent, name in walk:
                    try:
                        fd = _open_file(parent, name, key)
                    except (ObjectNotFound, InvalidKey):
                        continue  # deleted meanwhile, or a symlink planted there
                    try:
                        info = _read_info(fd, key)
                    except StoreError as exc:
                        logger.warning("skipping %r in a listing: %s", key, exc)
                        continue
                    finally:
                        os.close(fd)
                    if len(items) == limit:
                        return ListPage(items, items[-1].key)
                    items.append(ObjectSummary(key, info.size, info.etag, info.last_modified))
            finally:
                walk.close()
        finally:
            os.close(root)
        return ListPage(items, None)

    def _remove_stale_temp(self, older_than: float) -> int:
        removed = 0
        cutoff = time.time() - older_than
        root = self._open_root()
        try:
            tmp_dir = _open_dir(root, TEMP_DIR, TEMP_DIR, create=True)
        finally:
            os.close(root)
        try:
            with os.scandir(tmp_dir) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    if st.st_mtime < cutoff and not stat_module.S_ISDIR(st.st_mode):
                        try:
                            os.unlink(entry.name, dir_fd=tmp_dir)
                            removed += 1
                        except FileNotFoundError:
                            pass
        finally:
            os.close(tmp_dir)
        return removed


class _LocalReader(ObjectReader):
    """Reads one open file (so one version of the object, whatever renames follow) in
    chunks. A chunk in the page cache is read in the event loop with ``RWF_NOWAIT``
    (a copy from memory that never waits for the disk: a thread hop costs more than
    copying a chunk); anything else is a ``pread`` in a worker thread."""

    def __init__(
        self, store: LocalFSStore, fd: int, info: ObjectInfo, span: tuple[int, int] | None
    ) -> None:
        self.info = info
        self.span = span
        self._store = store
        self._fd = fd
        self._offset = 0 if span is None else span[0]
        self._remaining = self.content_length
        self._buffer: bytearray | None = None

    def __aiter__(self) -> _LocalReader:
        return self

    async def __anext__(self) -> bytes:
        if self._remaining <= 0 or self._fd < 0:
            raise StopAsyncIteration
        n = min(self._store._chunk_size, self._remaining)
        data = self._read_cached(n)
        if data is None:
            data = await self._store._run(os.pread, self._fd, n, self._offset)
        else:
            await trio.lowlevel.checkpoint()
        if not data:
            raise StoreError(f"{self.info.key!r} ended early on disk")
        self._offset += len(data)
        self._remaining -= len(data)
        return data

    def _read_cached(self, n: int) -> bytes | None:
        """Up to ``n`` bytes at the offset if the page cache has them, else None."""
        if _NOWAIT is None or not self._store._nowait_reads:
            return None
        if self._buffer is None:
            self._buffer = bytearray(self._store._chunk_size)
        view = memoryview(self._buffer)[:n]
        try:
            got = os.preadv(self._fd, [view], self._offset, _NOWAIT)
        except BlockingIOError:
            return None  # not cached (or a lock to wait for): the worker thread reads it
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._store._nowait_reads = False  # this filesystem or kernel cannot
                return None
            raise StoreUnavailable(f"local storage: {exc.strerror or exc}") from exc
        return bytes(view[:got]) if got > 0 else None

    async def aclose(self) -> None:
        self._buffer = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


# -- helpers ---------------------------------------------------------------------------------


def _url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/storage/{token}"


def _unsafe(key: str) -> InvalidKey:
    return InvalidKey(f"{key!r}: its path crosses a symlink or something not a directory")


def _open_dir(parent: int, name: str, key: str, create: bool) -> int:
    for _ in range(2):
        try:
            return os.open(name, _SAFE_DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise ObjectNotFound(key) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _unsafe(key) from None
            raise
        try:
            os.mkdir(name, 0o750, dir_fd=parent)
            os.fsync(parent)
        except FileExistsError:
            pass
    raise ObjectNotFound(key)


def _open_file(parent: int, name: str, key: str) -> int:
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        raise ObjectNotFound(key) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            raise _unsafe(key) from None
        raise
    return fd


def _exists(parent: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _refuse_unsafe_final(parent: int, name: str, key: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat_module.S_ISREG(st.st_mode):
        raise _unsafe(key)


def _read_info(fd: int, key: str) -> ObjectInfo:
    st = os.fstat(fd)
    if not stat_module.S_ISREG(st.st_mode):
        raise _unsafe(key)
    total = st.st_size
    try:
        if total < _TAIL.size:
            raise ValueError("too short")
        length, magic = _TAIL.unpack(os.pread(fd, _TAIL.size, total - _TAIL.size))
        if magic != MAGIC or length > MAX_META_JSON or length > total - _TAIL.size:
            raise ValueError("no metadata tail")
        size = total - _TAIL.size - length
        meta = json.loads(os.pread(fd, length, size))
        sha256 = meta["sha256"]
        content_type = meta["content_type"]
        metadata = meta["metadata"]
        if (
            meta["v"] != 1
            or meta["size"] != size
            or not isinstance(sha256, str)
            or not isinstance(content_type, str)
            or not isinstance(metadata, dict)
            or not all(isinstance(v, str) for v in metadata.values())
        ):
            raise ValueError("inconsistent metadata")
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise StoreError(f"{key!r} is not a stored object on disk ({exc})") from None
    return ObjectInfo(
        key=key,
        size=size,
        etag=sha256,
        content_type=content_type,
        metadata=metadata,
        sha256=sha256,
        last_modified=_mtime(st),
    )


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _close_all(fds: Sequence[int]) -> None:
    for fd in reversed(fds):
        os.close(fd)


def _walk(
    dir_fd: int, path: str, prefix: str, after: str | None
) -> Generator[tuple[str, int, str], None, None]:
    """``(key, parent directory descriptor, file name)`` of the objects below ``dir_fd``
    (whose keys start with ``path``) that start with ``prefix`` and sort after ``after``,
    in key order: a directory ``d`` sorts as ``d/``, which is where its keys fall."""
    entries: list[tuple[str, bool, str]] = []
    with os.scandir(dir_fd) as scan:
        for entry in scan:
            name = entry.name
            if name.startswith(".") or entry.is_symlink():
                continue
            if name.endswith(OBJECT_SUFFIX) and entry.is_file(follow_symlinks=False):
                key = path + name[: -len(OBJECT_SUFFIX)]
                is_dir = False
            elif entry.is_dir(follow_symlinks=False):
                key = f"{path}{name}/"
                is_dir = True
            else:
                continue
            entries.append((key, is_dir, name))
    entries.sort()
    for key, is_dir, name in entries:
        if is_dir:
            if not (key.startswith(prefix) or prefix.startswith(key)):
                continue
            # Every key below sorts before ``after`` when the directory does and ``after``
            # is not inside it.
            if after is not None and key < after and not after.startswith(key):
                continue
            try:
                sub = os.open(name, _SAFE_DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                yield from _walk(sub, key, prefix, after)
            finally:
                os.close(sub)
        elif key.startswith(prefix) and (after is None or key > after):
            try:
                validate_key(key)
            except InvalidKey:
                continue
            yield key, dir_fd, name
