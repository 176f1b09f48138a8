"""Store throughput: put and get of one large object on LocalFS and on S3 (rclone serve s3),
against a plain ``cp`` of the same file on the same disk, with the process's peak traced
memory (tracemalloc) during each transfer. A measurement, not a test (docs/storage.md).

    .venv/bin/python benchmarks/storage_throughput.py [--size-mib 256] [--dir DIR]

Every number is for data in the page cache (the source was just written), dirty pages
flushed before each run. ``cp`` copies in the kernel (copy_file_range) and does not wait for
the disk; ``cp + sync`` does; ``dd bs=1M conv=fsync`` moves the bytes through user space in
1 MiB reads and writes and fsyncs, as any streaming upload must (LocalFS's put fsyncs before
its rename).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.rclone import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    find_rclone,
    rclone_serve_s3,
)

from visiona_services.api_server.storage import LocalFSStore, S3Store, Store

MiB = 1024 * 1024
CHUNK = MiB


async def file_stream(path: Path) -> AsyncIterator[bytes]:
    """The file in 1 MiB chunks, read without blocking trio (what a route's request body
    would give, only faster)."""
    async with await trio.open_file(path, "rb") as source:
        while data := await source.read(CHUNK):
            yield data


#: Each transfer runs this many times; the table shows the median.
RUNS = 5


def median_row(label: str, size: int, runs: Sequence[tuple[float, int | None]]) -> list[str]:
    elapsed = sorted(seconds for seconds, _ in runs)[len(runs) // 2]
    peaks = [peak for _, peak in runs if peak is not None]
    peak = f"{max(peaks) / MiB:.1f}" if peaks else "-"
    return [label, f"{size / 1e6 / elapsed:.0f}", f"{elapsed:.2f}", peak]


async def timed(fn: Callable[[], Awaitable[object]]) -> tuple[float, int]:
    """Seconds and tracemalloc's peak for one run, dirty pages flushed before."""
    os.sync()
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    await fn()
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak


def shell_timed(command: str) -> tuple[float, None]:
    os.sync()
    started = time.perf_counter()
    subprocess.run(["sh", "-c", command], check=True)
    return time.perf_counter() - started, None


class Transfers:
    """Put and get of one key on a store, each run timed."""

    def __init__(self, name: str, store: Store, source: Path, size: int, expected: str) -> None:
        self.name, self.store, self.source, self.size = name, store, source, size
        self.expected = expected
        self.key = f"bench/{uuid.uuid4().hex}"
        self.puts: list[tuple[float, int | None]] = []
        self.gets: list[tuple[float, int | None]] = []

    async def put(self) -> None:
        stream = file_stream(self.source)
        info = await self.store.put(self.key, stream, self.size, "application/octet-stream", {})
        assert info.sha256 == self.expected

    async def get(self) -> None:
        received = 0
        async with await self.store.get(self.key) as obj:
            async for chunk in obj:
                received += len(chunk)
        assert received == self.size

    async def run_once(self) -> None:
        self.puts.append(await timed(self.put))
        self.gets.append(await timed(self.get))

    def rows(self) -> list[list[str]]:
        return [
            median_row(f"{self.name} put (sha256 on the way, fsync)", self.size, self.puts),
            median_row(f"{self.name} get", self.size, self.gets),
        ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="visiona-storage-bench-") as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        with source.open("wb") as out:
            for _ in range(args.size_mib):
                out.write(os.urandom(MiB))
            os.fsync(out.fileno())
        expected = hashlib.sha256(await trio.Path(source).read_bytes()).hexdigest()
        copy, synced = work / "copy1", work / "copy2"
        cp: list[tuple[float, int | None]] = []
        cp_sync: list[tuple[float, int | None]] = []
        dd: list[tuple[float, int | None]] = []
        local = Transfers(
            "LocalFS",
            LocalFSStore(work / "objects", signing_secret="b" * 40),
            source,
            size,
            expected,
        )
        # Interleaved, so that each sees the disk in the same mood (a shared VM's varies).
        for _ in range(RUNS):
            cp.append(shell_timed(f"cp '{source}' '{copy}' && rm '{copy}'"))
            cp_sync.append(
                shell_timed(f"cp '{source}' '{synced}' && sync '{synced}' && rm '{synced}'")
            )
            dd.append(
                shell_timed(
                    f"dd if='{source}' of='{synced}' bs=1M conv=fsync status=none && rm '{synced}'"
                )
            )
            await local.run_once()
        rows = [
            median_row("cp (same disk)", size, cp),
            median_row("cp + sync (the copy fsynced)", size, cp_sync),
            median_row("dd bs=1M conv=fsync (read/write, fsynced)", size, dd),
            *local.rows(),
        ]
        binary, reason = find_rclone()
        if binary is None:
            print(f"S3 skipped: {reason}", file=sys.stderr)
        else:
            with rclone_serve_s3(binary) as server:
                async with httpx.AsyncClient(timeout=60) as http:
                    s3 = S3Store(server.endpoint, "bench", REGION, ACCESS_KEY, SECRET_KEY, http)
                    await s3.ensure_bucket()
                    remote = Transfers("S3 (rclone serve s3)", s3, source, size, expected)
                    for _ in range(RUNS):
                        await remote.run_once()
                    rows += remote.rows()
    print(
        f"{args.size_mib} MiB object, page cache warm, dirty pages flushed before each run;"
        f" median of {RUNS}; peak = tracemalloc's peak during a run (MiB)\n"
    )
    print("| transfer | MB/s | seconds | peak MiB |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    trio.run(main)
