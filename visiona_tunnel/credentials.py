"""The agent's stored credentials: what pairing gave, kept in one JSON file.

``{"device_id", "device_token", "relay_url", "api_url", "paired_at"}``, by default in
``$XDG_CONFIG_HOME/visiona/agent.json`` (``~/.config/visiona/agent.json``). The file is
written atomically (a temporary file in the same directory, mode 0600, fsync, rename, fsync
of the directory), so a crash leaves the old file or the new one, never half of one; the
directories it creates are 0700. Blocking file I/O: call it from a thread in async code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import attrs

from .client import check_relay_url
from .pairing import PairingResult

__all__ = [
    "CREDENTIALS_FILE_MODE",
    "CredentialsError",
    "DeviceCredentials",
    "default_credentials_path",
    "load_credentials",
    "prepare_credentials_dir",
    "store_credentials",
]

logger = logging.getLogger(__name__)

CREDENTIALS_FILE_MODE = 0o600
_DIR_MODE = 0o700
#: A credentials file is a few hundred bytes; a larger one is not ours.
_MAX_FILE_SIZE = 64 * 1024
_FIELDS = ("device_id", "device_token", "relay_url", "api_url", "paired_at")


class CredentialsError(Exception):
    """The credentials file cannot be read, written or understood (the message says which
    file and why; it never holds the token)."""


@attrs.frozen(kw_only=True)
class DeviceCredentials:
    """A paired device: what it dials with. ``device_token`` is left out of ``repr``."""

    device_id: str
    device_token: str = attrs.field(repr=False)
    relay_url: str
    api_url: str
    #: When the pairing happened: ISO 8601, UTC (``2025-01-31T12:00:00Z``).
    paired_at: str

    @staticmethod
    def now() -> str:
        """The current time as :attr:`paired_at` writes it."""
        return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    @classmethod
    def of_pairing(cls, result: PairingResult, api_url: str) -> DeviceCredentials:
        """What a pairing exchange at ``api_url`` just gave, paired now."""
        return cls(
            device_id=result.device_id,
            device_token=result.device_token,
            relay_url=result.relay_url,
            api_url=api_url,
            paired_at=cls.now(),
        )

    def to_json(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_json(cls, value: object) -> DeviceCredentials:
        """The file's JSON value -> credentials. Unknown keys are ignored.

        Raises:
            ValueError: not an object with the five non-empty strings, or ``relay_url`` is
            not a ws:// or wss:// URL.
        """
        if not isinstance(value, Mapping):
            raise ValueError("not a JSON object")
        fields: dict[str, str] = {}
        for name in _FIELDS:
            item = value.get(name)
            if not isinstance(item, str) or not item:
                raise ValueError(f"{name!r} is missing or not a non-empty string")
            fields[name] = item
        check_relay_url(fields["relay_url"])
        return cls(**fields)


def default_credentials_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/visiona/agent.json``, or ``~/.config/visiona/agent.json`` when
    ``XDG_CONFIG_HOME`` is unset, empty or relative (as the XDG spec says)."""
    env = os.environ if environ is None else environ
    config_home = env.get("XDG_CONFIG_HOME", "")
    if not config_home or not os.path.isabs(config_home):
        home = env.get("HOME") or os.path.expanduser("~")
        config_home = os.path.join(home, ".config")
    return Path(config_home) / "visiona" / "agent.json"


def load_credentials(path: Path) -> DeviceCredentials | None:
    """The credentials in ``path``; None if there is no such file.

    Logs a warning if others than the owner may read it.

    Raises:
        CredentialsError: it exists but cannot be read or is not a credentials file.
    """
    try:
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise CredentialsError(f"the credentials file {path} is not a regular file")
            raw = file.read(_MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(f"cannot read the credentials file {path}: {exc.strerror}") from None
    if len(raw) > _MAX_FILE_SIZE:
        raise CredentialsError(f"the credentials file {path} is too large to be one")
    try:
        credentials = DeviceCredentials.from_json(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        # json's messages quote positions, not content; ours name fields, not values.
        reason = str(exc) if not isinstance(exc, json.JSONDecodeError) else "not JSON"
        raise CredentialsError(
            f"the credentials file {path} is not valid ({reason}): remove it and pair again"
        ) from None
    if stat.S_IMODE(mode) & 0o077:
        logger.warning(
            "the credentials file may be read by others than its owner: chmod 600 it",
            extra={"path": str(path), "mode": oct(stat.S_IMODE(mode))},
        )
    return credentials


def prepare_credentials_dir(path: Path) -> None:
    """Create the directories above ``path`` (0700) and check that a file can be written
    there, so that a failure shows before the pairing token is spent.

    Raises:
        CredentialsError: the directory cannot be created or written to.
    """
    _make_dirs(path.parent)
    try:
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
    except OSError as exc:
        raise CredentialsError(f"cannot write in {path.parent}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    if path.is_dir():
        raise CredentialsError(f"the credentials path {path} is a directory")


def store_credentials(path: Path, credentials: DeviceCredentials) -> None:
    """Write ``credentials`` to ``path`` atomically, mode 0600 (replacing any file there).

    Raises:
        CredentialsError: it could not be written (``path`` is then as it was).
    """
    _make_dirs(path.parent)
    data = json.dumps(credentials.to_json(), indent=2).encode() + b"\n"
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CredentialsError(f"cannot write in {path.parent}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, CREDENTIALS_FILE_MODE)  # mkstemp's already; said, not assumed
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise CredentialsError(f"cannot write the credentials file {path}: {exc}") from None
    _fsync_dir(path.parent)


def _make_dirs(directory: Path) -> None:
    missing: list[Path] = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    try:
        for candidate in reversed(missing):
            with contextlib.suppress(FileExistsError):
                candidate.mkdir(mode=_DIR_MODE)
    except OSError as exc:
        raise CredentialsError(f"cannot create the directory {candidate}: {exc.strerror}") from None
    if not directory.is_dir():
        raise CredentialsError(f"{directory} is not a directory")


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable. Some file systems refuse to fsync a directory: then the
    rename is as durable as they make it."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
