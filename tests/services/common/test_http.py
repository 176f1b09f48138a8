"""Request ids, bearer checks and the envelope."""

from __future__ import annotations

import pytest

from visiona_services.common.http import (
    bearer_matches,
    current_request_id,
    error_envelope,
    sane_request_id,
)


@pytest.mark.parametrize("value", ["a", "A-z_0.9", "x" * 128, b"bytes-id"])
def test_sane_request_ids_are_kept(value: str | bytes) -> None:
    expected = value.decode() if isinstance(value, bytes) else value
    assert sane_request_id(value) == expected


@pytest.mark.parametrize("value", [None, "", "x" * 129, "a b", "a/b", "é", "a\n"])
def test_insane_request_ids_are_refused(value: str | None) -> None:
    assert sane_request_id(value) is None


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ([(b"authorization", b"Bearer s3cret")], True),
        ([(b"Authorization", b"bearer s3cret")], True),
        ([(b"authorization", b"Bearer  s3cret ")], True),
        ([], False),
        ([(b"authorization", b"Bearer s3cre")], False),
        ([(b"authorization", b"Bearer s3cretX")], False),
        ([(b"authorization", b"Basic s3cret")], False),
        ([(b"authorization", b"s3cret")], False),
        ([(b"authorization", b"Bearer s3cret")] * 2, False),
    ],
)
def test_bearer_matches(headers: list[tuple[bytes, bytes]], ok: bool) -> None:
    assert bearer_matches(headers, "s3cret") is ok


def test_an_empty_secret_never_matches() -> None:
    assert not bearer_matches([(b"authorization", b"Bearer ")], "")


def test_error_envelope_takes_the_current_request_id() -> None:
    token = current_request_id.set("rid-1")
    try:
        envelope = error_envelope("CODE", "message")
    finally:
        current_request_id.reset(token)
    assert envelope == {
        "success": False,
        "error": {"code": "CODE", "message": "message", "request_id": "rid-1"},
    }
