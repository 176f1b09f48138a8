"""A throwaway PostgreSQL server for tests, and fresh databases on it.

``postgres_server()`` runs a cluster of its own (initdb in a temporary directory, trust auth,
127.0.0.1 and a free port, durability off for speed) and yields its SQLAlchemy URL, or
yields ``$VISIONA_TEST_POSTGRES_URL`` when that is set. ``create_database`` makes a fresh
database on a server, e.g. one per test module.

initdb refuses to run as root: as root the cluster belongs to the ``postgres`` OS user
(Debian's postgresql package creates it), and its commands run through ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import sqlalchemy
from sqlalchemy.pool import NullPool

#: When set, the tests use the server at this SQLAlchemy URL instead of starting one.
URL_VARIABLE = "VISIONA_TEST_POSTGRES_URL"
INSTALL_HINT = "apt-get install postgresql"
DEFAULT_DATABASE = "visiona_test"
#: The OS user that owns the cluster when the tests run as root.
OS_USER = "postgres"
#: Upper bound for the server to start or stop (pg_ctl -t), in seconds.
PG_CTL_TIMEOUT = 30
#: Free ports are picked, then bound by the server: another process may take one between.
START_ATTEMPTS = 3
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    # A throwaway cluster: losing it in a crash is fine, waiting for the disk is not.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class PostgresUnavailable(Exception):
    """PostgreSQL's server binaries (or, as root, the ``postgres`` OS user) are missing."""


class PostgresFailed(Exception):
    """initdb or the server failed; the message has their output."""


def find_bindir() -> Path:
    """The directory of ``initdb``, ``pg_ctl`` and ``postgres``: ``pg_config --bindir``, else
    the newest ``/usr/lib/postgresql/<version>/bin`` (Debian keeps them off PATH)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        output = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if output.returncode == 0:
            candidates.append(Path(output.stdout.strip()))
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda path: _version_key(path.parent.name), reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PostgresUnavailable("PostgreSQL's initdb, pg_ctl and postgres were not found")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Cluster:
    """initdb, start and stop, as the ``postgres`` OS user when we are root."""

    def __init__(self, bindir: Path, base: Path) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.log = base / "postgres.log"
        self.as_root = os.geteuid() == 0

    def _run(self, tool: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", OS_USER, "--", *command]
        # A PG* variable of the caller's (PGDATA, PGPORT...) must not steer the cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=self.base)

    def _check(self, tool: str, args: Sequence[str]) -> None:
        done = self._run(tool, args)
        if done.returncode != 0:
            raise PostgresFailed(f"{tool} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def prepare(self) -> None:
        if self.as_root:
            try:
                user = pwd.getpwnam(OS_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root needs the {OS_USER!r} OS user to own the cluster"
                ) from None
            os.chown(self.base, user.pw_uid, user.pw_gid)
        # --no-sync: nothing to keep if the machine crashes; C locale: no locale lookups.
        args = ["-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        self._check("initdb", [*args, "--locale=C", "--no-sync"])
        settings = {**SETTINGS, "unix_socket_directories": f"'{self.base}'"}
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def start(self) -> int:
        """Start the server on a free port; the port."""
        failure = ""
        for _ in range(START_ATTEMPTS):
            port = _free_port()
            args = ["start", "-D", str(self.data), "-l", str(self.log), "-w"]
            done = self._run("pg_ctl", [*args, "-t", str(PG_CTL_TIMEOUT), "-o", f"-p {port}"])
            if done.returncode == 0:
                return port
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            failure = f"{done.stdout}{done.stderr}{log}"
        raise PostgresFailed(f"the server did not start:\n{failure}")

    def stop(self) -> None:
        self._run("pg_ctl", ["stop", "-D", str(self.data), "-m", "immediate", "-w"])


@contextlib.contextmanager
def postgres_server(*, database: str = DEFAULT_DATABASE) -> Iterator[str]:
    """A PostgreSQL server with an empty ``database``, for the ``with`` block: the SQLAlchemy
    URL ``postgresql+psycopg://postgres@127.0.0.1:PORT/<database>``. With
    ``$VISIONA_TEST_POSTGRES_URL`` set, that URL as it is. Raises ``PostgresUnavailable``
    when PostgreSQL is not installed."""
    external = os.environ.get(URL_VARIABLE)
    if external:
        yield external
        return
    bindir = find_bindir()
    # As root the postgres user must reach the directory: pytest's and $TMPDIR's temporary
    # directories may sit below ones only root can enter; /tmp is open to all.
    base = Path(tempfile.mkdtemp(prefix="visiona-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    try:
        cluster = _Cluster(bindir, base)
        cluster.prepare()
        port = cluster.start()
        try:
            server = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
            yield create_database(server, database)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """Create the empty database ``name`` on the server of ``url`` (dropping one of that name
    first, with its connections) and return ``url`` pointing at it."""
    if not 0 < len(name.encode()) <= 63:  # PostgreSQL would silently truncate a longer one
        raise ValueError(f"not a PostgreSQL database name: {name!r}")
    server = sqlalchemy.make_url(url)
    engine = sqlalchemy.create_engine(
        server.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    quoted = engine.dialect.identifier_preparer.quote(name)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {quoted}"))
    finally:
        engine.dispose()
    return server.set(database=name).render_as_string(hide_password=False)
