"""A stand-in for the api-server's pairing exchange, for agent tests.

``PairingApi`` serves ``POST {prefix}/api/pairing/exchange`` on 127.0.0.1 (h11 over
``trio.serve_tcp``, optionally TLS) as the contract says: 200 with ``device_id``,
``device_token`` and ``relay_url`` for a pending pairing token (which it then marks used),
401 ``PAIRING_TOKEN_INVALID`` for any other, 400 for a body that is not ``{"token": str}``.
Answers queued in ``script`` go out first, one per request (503, 429 with ``Retry-After`` ...).
Every request is recorded. ``tls_contexts`` makes a self-signed certificate for 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import secrets
import ssl
import tempfile
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

EXCHANGE_PATH = "/api/pairing/exchange"


@dataclass
class Recorded:
    """One request the stand-in received."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Canned:
    """An answer given instead of the contract's."""

    status: int
    body: dict[str, object] = field(default_factory=dict)
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Device:
    """What a pending pairing token turns into."""

    device_id: str
    device_token: str


def new_pairing_token() -> str:
    return "vAc_" + secrets.token_hex(16)


def error_body(code: str, message: str) -> dict[str, object]:
    return {
        "success": False,
        "error": {"code": code, "message": message, "request_id": secrets.token_hex(8)},
    }


class PairingApi:
    def __init__(
        self,
        relay_url: str,
        *,
        prefix: str = "",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.relay_url = relay_url
        self.prefix = prefix
        self.ssl_context = ssl_context
        self.port = 0
        #: Pending pairing tokens; an exchanged one moves to ``used``.
        self.pending: dict[str, Device] = {}
        self.used: set[str] = set()
        self.script: deque[Canned] = deque()
        self.requests: list[Recorded] = []
        self._in, self._out = trio.open_memory_channel[Recorded](math.inf)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.prefix}"

    def add_device(self, device_id: str = "device-1") -> tuple[str, Device]:
        """A new pending pairing token and the device it will give."""
        token = new_pairing_token()
        device = Device(device_id, "dt_" + secrets.token_hex(16))
        self.pending[token] = device
        return token, device

    async def start(self, nursery: trio.Nursery) -> None:
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]

    async def next_request(self, timeout: float = 10.0) -> Recorded:
        """The next request not yet taken here."""
        with trio.fail_after(timeout):
            return await self._out.receive()

    async def _handle(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if self.ssl_context is not None:
            stream = trio.SSLStream(tcp, self.ssl_context, server_side=True)
        try:
            async with stream:
                await self._exchange(stream)
        except (trio.BrokenResourceError, h11.ProtocolError):
            pass

    async def _exchange(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if request is None:
            return
        recorded = Recorded(
            request.method.decode(),
            request.target.decode(),
            {name.decode(): value.decode() for name, value in request.headers},
            bytes(body),
        )
        self.requests.append(recorded)
        self._in.send_nowait(recorded)
        answer = self.script.popleft() if self.script else self._answer(recorded)
        data = json.dumps(answer.body).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
            *answer.headers,
        ]
        await stream.send_all(conn.send(h11.Response(status_code=answer.status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=data)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    def _answer(self, request: Recorded) -> Canned:
        if request.method != "POST" or request.target != self.prefix + EXCHANGE_PATH:
            return Canned(404, error_body("NOT_FOUND", "not found"))
        try:
            token = json.loads(request.body)["token"]
        except (ValueError, KeyError, TypeError):
            token = None
        content_type = request.headers.get("content-type", "")
        if not isinstance(token, str) or not content_type.startswith("application/json"):
            return Canned(400, error_body("VALIDATION_ERROR", "token: required"))
        device = self.pending.pop(token, None)
        if device is None:
            return Canned(401, error_body("PAIRING_TOKEN_INVALID", "pairing token invalid"))
        self.used.add(token)
        data = {
            "device_id": device.device_id,
            "device_token": device.device_token,
            "relay_url": self.relay_url,
        }
        return Canned(200, {"success": True, "data": data})


async def start_pairing_api(
    nursery: trio.Nursery,
    relay_url: str,
    *,
    prefix: str = "",
    ssl_context: ssl.SSLContext | None = None,
) -> PairingApi:
    api = PairingApi(relay_url, prefix=prefix, ssl_context=ssl_context)
    await api.start(nursery)
    return api


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and a client
    context that trusts only it (and checks the host name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as directory:
        cert_file, key_file = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client
