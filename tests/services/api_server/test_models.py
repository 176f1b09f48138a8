"""Models: init -> presigned PUT -> finalize -> presigned GET, on the local store (the
api-server's ``/storage/{token}`` route) and on S3 (``rclone serve s3``, which checks the
signatures); the checks of finalize, the limits, ranges, tampered and expired URLs, the
sweep of stale uploads, tenancy of models."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from support.apiserver import CSRF, STEP_TIMEOUT, Api, running_api
from support.data import pattern_body, pattern_sha256
from support.pyrelay import traced_peak
from support.rclone import ACCESS_KEY, REGION, SECRET_KEY, RcloneS3
from support.tunnelhttp import http_exchange

from visiona_services.api_server.api.models import sweep_expired_models
from visiona_services.api_server.storage import LocalFSStore

from .conftest import start_stack

MB = 1_000_000


def _body(size: int, seed: int = 1) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]


async def _init(browser: httpx.AsyncClient, size: int, **more: Any) -> dict[str, Any]:
    response = await browser.post(
        "/api/models/init",
        json={"name": "yolo", "filename": "yolo.onnx", "size": size, **more},
        headers=CSRF,
    )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def _upload(upload: dict[str, Any], body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=STEP_TIMEOUT) as uploader:
        return await uploader.request(
            upload["upload_method"],
            upload["upload_url"],
            content=body,
            headers=upload["upload_headers"],
        )


async def _logged_in(api: Api, browser: httpx.AsyncClient) -> None:
    await api.login(browser, "alice")


async def test_a_model_is_uploaded_finalized_and_downloaded(api: Api) -> None:
    body = _body(3 * MB + 17)
    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, len(body), sha256=hashlib.sha256(body).hexdigest())
        assert upload["upload_method"] == "PUT"
        assert upload["upload_url"].startswith(f"{api.url}/storage/")
        stored = await _upload(upload, body)
        finalized = await browser.post(f"/api/models/{upload['model_id']}/finalize", headers=CSRF)
        model = (await browser.get(f"/api/models/{upload['model_id']}")).json()["data"]
        async with httpx.AsyncClient() as downloader:
            got = await downloader.get(model["download_url"])
    assert stored.status_code == 200
    assert finalized.json()["data"]["status"] == "ready"
    assert model["sha256"] == hashlib.sha256(body).hexdigest()
    assert model["size"] == len(body)
    assert got.content == body
    assert got.headers["etag"] == f'"{model["sha256"]}"'


async def test_ranges_and_head_on_a_download(api: Api) -> None:
    body = _body(100_000)
    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, len(body))
        await _upload(upload, body)
        await browser.post(f"/api/models/{upload['model_id']}/finalize", headers=CSRF)
        url = (await browser.get(f"/api/models/{upload['model_id']}")).json()["data"][
            "download_url"
        ]
    async with httpx.AsyncClient() as client:
        middle = await client.get(url, headers={"Range": "bytes=10-19"})
        suffix = await client.get(url, headers={"Range": "bytes=-5"})
        beyond = await client.get(url, headers={"Range": "bytes=200000-"})
        head = await client.head(url)
    assert (middle.status_code, middle.content) == (206, body[10:20])
    assert middle.headers["content-range"] == f"bytes 10-19/{len(body)}"
    assert (suffix.status_code, suffix.content) == (206, body[-5:])
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(body)}"
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(body))


async def test_a_model_over_the_limit_is_refused_at_init(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        response = await browser.post(
            "/api/models/init",
            json={"name": "big", "filename": "big.bin", "size": api.config.model_max_size + 1},
            headers=CSRF,
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "MODEL_TOO_LARGE"


async def test_more_bytes_than_signed_are_refused_and_nothing_kept(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, 1000)
        refused = await _upload(upload, _body(1001))
        finalized = await browser.post(f"/api/models/{upload['model_id']}/finalize", headers=CSRF)
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert finalized.status_code == 409
    assert finalized.json()["error"]["code"] == "UPLOAD_INCOMPLETE"


async def test_a_chunked_upload_over_the_signed_size_is_cut_off(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: checked as it streams
        for _ in range(4):
            yield _body(400)

    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, 1000)
        async with httpx.AsyncClient() as uploader:
            refused = await uploader.put(
                upload["upload_url"], content=chunks(), headers=upload["upload_headers"]
            )
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert (await api.server.services.store.list("models/")).items == []


async def test_a_storage_url_that_is_not_ours_is_refused(api: Api) -> None:
    async with api.browser() as anyone:
        garbage = await anyone.get("/storage/v1.garbage.garbage")
        wrong_method = await anyone.delete("/storage/v1.garbage.garbage")
    assert garbage.status_code == 403
    assert garbage.json()["error"]["code"] == "SIGNATURE_INVALID"
    assert wrong_method.status_code == 405


async def test_a_download_url_of_a_deleted_model_finds_nothing(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, 10)
        await _upload(upload, _body(10))
        ready = await browser.post(f"/api/models/{upload['model_id']}/finalize", headers=CSRF)
        await browser.delete(f"/api/models/{upload['model_id']}", headers=CSRF)
    async with httpx.AsyncClient() as client:
        gone = await client.get(ready.json()["data"]["download_url"])
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "OBJECT_NOT_FOUND"


async def test_an_upload_cut_short_leaves_nothing(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, 1 * MB)
        target = upload["upload_url"].removeprefix(api.url)
        port = int(api.url.rsplit(":", 1)[1])
        with trio.fail_after(STEP_TIMEOUT):
            async with http_exchange(port) as exchange:
                headers = [
                    ("connection", "close"),
                    ("content-type", "application/octet-stream"),
                    ("content-length", str(MB)),
                ]
                await exchange.send_request("PUT", target, headers=headers, end=False)
                await exchange.send_body_piece(_body(MB // 2))
            # the connection is closed mid-body: the store must keep nothing
        finalized = await browser.post(f"/api/models/{upload['model_id']}/finalize", headers=CSRF)
    assert finalized.status_code == 409
    assert (await api.server.services.store.list("models/")).items == []


async def test_finalize_checks_the_declared_sha256(api: Api) -> None:
    body = _body(5000)
    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, len(body), sha256="0" * 64)
        await _upload(upload, body)
        response = await browser.post(f"/api/models/{upload['model_id']}/finalize", headers=CSRF)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "CHECKSUM_MISMATCH"


async def test_finalize_before_the_upload_is_incomplete(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, 10)
        response = await browser.post(f"/api/models/{upload['model_id']}/finalize", headers=CSRF)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "UPLOAD_INCOMPLETE"


async def test_tampered_and_expired_urls_are_refused(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, 10)
    url: str = upload["upload_url"]
    tampered = {**upload, "upload_url": url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")}
    refused = await _upload(tampered, b"0123456789")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "SIGNATURE_INVALID"
    services = api.server.services
    current = services.store
    assert isinstance(current, LocalFSStore)
    later = LocalFSStore(
        api.config.objects_dir,
        signing_secret=api.config.storage_signing_secret,
        clock=lambda: 4e9,  # far in the future
    )
    services.store = later
    try:
        expired = await _upload(upload, b"0123456789")
    finally:
        services.store = current
    assert expired.status_code == 403
    assert expired.json()["error"]["code"] == "URL_EXPIRED"


async def test_models_are_listed_newest_first_and_deleted_with_their_object(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        ids = []
        for size in (1, 2, 3):
            upload = await _init(browser, size)
            await _upload(upload, _body(size))
            ids.append(upload["model_id"])
        first = (await browser.get("/api/models", params={"limit": 2})).json()["data"]
        rest = (
            await browser.get("/api/models", params={"limit": 2, "before": first["next_before"]})
        ).json()["data"]
        deleted = await browser.delete(f"/api/models/{ids[0]}", headers=CSRF)
        gone = await browser.get(f"/api/models/{ids[0]}")
    listed = [m["id"] for m in first["models"] + rest["models"]]
    assert sorted(listed) == sorted(ids) and rest["next_before"] is None
    assert deleted.status_code == 200 and gone.status_code == 404
    keys = [item.key for item in (await api.server.services.store.list("models/")).items]
    assert not any(key.endswith(ids[0]) for key in keys) and len(keys) == 2


async def test_stale_uploads_are_swept_with_their_objects(api: Api) -> None:
    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, 10)
        await _upload(upload, _body(10))
        api.clock.advance(api.config.model_upload_ttl + 1)
        swept = await sweep_expired_models(api.server.services)
        await _logged_in(api, browser)  # the session has idled out meanwhile
        gone = await browser.get(f"/api/models/{upload['model_id']}")
        events = (await browser.get("/api/audit")).json()["data"]["events"]
    assert swept == 1 and gone.status_code == 404
    assert (await api.server.services.store.list("models/")).items == []
    assert [e["action"] for e in events[:2]] == ["auth:login", "model:expire"]


async def test_model_steps_are_audited(api: Api) -> None:
    body = _body(10)
    async with api.browser() as browser:
        await _logged_in(api, browser)
        upload = await _init(browser, len(body))
        await _upload(upload, body)
        await browser.post(f"/api/models/{upload['model_id']}/finalize", headers=CSRF)
        await browser.delete(f"/api/models/{upload['model_id']}", headers=CSRF)
        events = (await browser.get("/api/audit")).json()["data"]["events"]
    assert [e["action"] for e in events[:3]] == ["model:delete", "model:finalize", "model:init"]


# -- S3 ---------------------------------------------------------------------------------


@pytest.fixture
async def s3_api(
    nursery: trio.Nursery, database_url: str, tmp_path: Path, rclone_s3: RcloneS3
) -> AsyncIterator[Api]:
    stack = await start_stack(
        nursery,
        database_url,
        tmp_path,
        storage_backend="s3",
        s3_endpoint=rclone_s3.endpoint,
        s3_bucket=f"t{uuid.uuid4().hex[:20]}",
        s3_region=REGION,
        s3_access_key=ACCESS_KEY,
        s3_secret_key=SECRET_KEY,
    )
    async with running_api(stack.config, stack.sockets, stack.url, stack.provider) as api:
        yield api


async def test_on_s3_the_browser_uploads_and_downloads_at_the_s3_server(s3_api: Api) -> None:
    body = _body(2 * MB + 3)
    async with s3_api.browser() as browser:
        await _logged_in(s3_api, browser)
        upload = await _init(browser, len(body), sha256=hashlib.sha256(body).hexdigest())
        assert upload["upload_url"].startswith(s3_api.config.s3_endpoint)
        assert "X-Amz-Signature=" in upload["upload_url"]
        stored = await _upload(upload, body)
        finalized = await browser.post(f"/api/models/{upload['model_id']}/finalize", headers=CSRF)
        model = finalized.json()["data"]
        async with httpx.AsyncClient() as downloader:
            got = await downloader.get(model["download_url"])
            tampered = await downloader.get(
                model["download_url"].replace("Signature=", "Signature=0")
            )
    assert stored.status_code == 200
    assert model["status"] == "ready" and model["sha256"] == hashlib.sha256(body).hexdigest()
    assert got.content == body
    assert tampered.status_code == 403


# -- large and many ------------------------------------------------------------------------

#: Heavy transfers: SQLite only (the database plays no part in the bytes).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
GiB = 1 << 30
#: What the whole process (browser, api-server, store) may hold at once for a 1 GiB
#: object: a few chunks and buffers, not the object.
GIB_MEMORY_BOUND = 32 << 20


@SQLITE_ONLY
async def test_a_1_gib_model_goes_up_and_down_with_flat_memory(
    nursery: trio.Nursery, database_url: str, tmp_path: Path
) -> None:
    stack = await start_stack(nursery, database_url, tmp_path, model_max_size_mb=GiB // MB + 1)
    async with (
        running_api(stack.config, stack.sockets, stack.url, stack.provider) as api,
        api.browser() as browser,
    ):
        await _logged_in(api, browser)
        upload = await _init(browser, GiB, sha256=pattern_sha256(GiB))
        async with traced_peak() as up_peak, httpx.AsyncClient(timeout=60) as client:
            stored = await client.put(
                upload["upload_url"],
                content=pattern_body(GiB),
                headers={**upload["upload_headers"], "Content-Length": str(GiB)},
            )
        finalized = await browser.post(f"/api/models/{upload['model_id']}/finalize", headers=CSRF)
        url = finalized.json()["data"]["download_url"]
        digest = hashlib.sha256()
        received = 0
        async with (
            traced_peak() as down_peak,
            httpx.AsyncClient(timeout=60) as client,
            client.stream("GET", url) as response,
        ):
            async for chunk in response.aiter_raw():
                digest.update(chunk)
                received += len(chunk)
    assert stored.status_code == 200
    assert finalized.json()["data"]["status"] == "ready"
    assert (received, digest.hexdigest()) == (GiB, pattern_sha256(GiB))
    assert up_peak[0] < GIB_MEMORY_BOUND, f"upload peak {up_peak[0] >> 20} MiB"
    assert down_peak[0] < GIB_MEMORY_BOUND, f"download peak {down_peak[0] >> 20} MiB"


async def test_concurrent_uploads_each_keep_their_own_bytes(api: Api) -> None:
    count = 8
    async with api.browser() as browser:
        await _logged_in(api, browser)
        uploads = [await _init(browser, 200_000 + i) for i in range(count)]

        async def put(i: int) -> None:
            response = await _upload(uploads[i], _body(200_000 + i, seed=i))
            assert response.status_code == 200

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(put, i)
        finalized = [
            (await browser.post(f"/api/models/{u['model_id']}/finalize", headers=CSRF)).json()
            for u in uploads
        ]
    assert [m["data"]["sha256"] for m in finalized] == [
        hashlib.sha256(_body(200_000 + i, seed=i)).hexdigest() for i in range(count)
    ]
