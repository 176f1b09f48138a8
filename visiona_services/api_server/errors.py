"""Errors the domain raises (without knowing about HTTP frameworks); the app answers each
with the envelope, its status and its code."""

from __future__ import annotations

__all__ = ["Conflict", "DomainError", "Invalid", "NotFound", "Unauthorized"]


class DomainError(Exception):
    status = 400
    code = "BAD_REQUEST"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFound(DomainError):
    """Not there, or not the caller's: both answer the same (tenancy)."""

    status = 404
    code = "NOT_FOUND"


class Conflict(DomainError):
    status = 409
    code = "CONFLICT"


class Invalid(DomainError):
    """A request body or parameter that does not make sense."""

    status = 400
    code = "INVALID_REQUEST"


class Unauthorized(DomainError):
    status = 401
    code = "UNAUTHORIZED"
