"""The api-server: the browser-facing REST/WS service (OIDC login, and later pairing,
devices, forwarding and models). See docs/api-server.md."""

from .app import create_app
from .config import ApiConfig
from .server import CannotListen, RunningApiServer, serve_api_server
from .services import ApiServices, open_services

__all__ = [
    "ApiConfig",
    "ApiServices",
    "CannotListen",
    "RunningApiServer",
    "create_app",
    "open_services",
    "serve_api_server",
]
