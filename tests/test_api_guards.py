"""Hostile clients against the API in-process on the real database: the rate limit, the origin policy,
slow senders, floods of parts and metacharacters in every text field. Each is answered with a clear 4xx
and stores nothing."""
from __future__ import annotations

import asyncio

import pytest

from services.api.guards import TokenBuckets
from tests.conftest import make_jpeg
from tests.test_api_uploads import FIELDS, NOTHING, api_client, post, stored


def test_token_buckets_allow_a_burst_then_the_rate_and_forget_the_least_recent():
    b = TokenBuckets(per_s=2, burst=3, max_clients=2)
    assert [b.take("a", 0.0) for _ in range(3)] == [0, 0, 0]
    assert b.take("a", 0.0) == pytest.approx(0.5)  # one token comes back every 0.5 s
    assert b.take("a", 0.6) == 0 and b.take("a", 0.6) > 0
    assert b.take("b", 0.6) == 0  # another client has its own bucket
    b.take("c", 0.6)  # a third: the least recently seen ("a") is forgotten, memory stays bounded
    assert "a" not in b._buckets and len(b._buckets) == 2


async def test_a_client_over_its_rate_is_told_to_slow_down_and_probes_are_never_limited(pg_dsn, tmp_path):
    async with api_client(pg_dsn, tmp_path, rate_limit_per_s=0.5, rate_limit_burst=3) as api:
        answers = [(await api.get("/v1/config")).status_code for _ in range(4)]
        assert answers == [200, 200, 200, 429]
        r = await api.get("/v1/config")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "slow down" in r.json()["error"]
        r = await post(api, [("a.jpg", make_jpeg(), "image/jpeg")])
        assert r.status_code == 429 and await stored(api) == NOTHING
        for _ in range(10):  # Kubernetes probes and Prometheus still see the API
            assert (await api.get("/healthz")).status_code == 200
            assert (await api.get("/metrics")).status_code == 200
        assert "rate-limited" in (await api.get("/metrics")).text


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(pg_dsn, tmp_path):
    """Behind an ingress every request comes from the proxy's address: keyed on it, every client would
    share one bucket. A forwarded address counts only when the peer is a proxy we trust."""
    def via(client: str) -> dict:
        return {"X-Forwarded-For": f"{client}, 10.1.2.3"}  # the client, then an inner proxy of ours

    async with api_client(pg_dsn, tmp_path, rate_limit_per_s=0.01, rate_limit_burst=2,
                          trusted_proxies="127.0.0.1, 10.0.0.0/8") as api:
        first = [(await api.get("/v1/config", headers=via("203.0.113.5"))).status_code for _ in range(3)]
        second = [(await api.get("/v1/config", headers=via("198.51.100.7"))).status_code for _ in range(3)]
        assert first == second == [200, 200, 429]
        r = await api.get("/v1/config", headers=via("203.0.113.5"))
        assert "203.0.113.5" in r.json()["error"]
    async with api_client(pg_dsn, tmp_path, rate_limit_per_s=0.01, rate_limit_burst=2) as api:
        # no trusted proxy: the header is anyone's to write, and is ignored
        answers = [(await api.get("/v1/config", headers=via(f"203.0.113.{n}"))).status_code for n in range(3)]
        assert answers == [200, 200, 429]


async def test_state_changes_from_other_origins_are_refused(pg_dsn, tmp_path):
    async with api_client(pg_dsn, tmp_path, cors_origins="https://dash.example.org") as api:
        evil = {"Origin": "https://evil.example"}
        r = await api.post("/v1/uploads", data=FIELDS, files=[("files", ("a.jpg", make_jpeg(), "image/jpeg"))],
                           headers=evil)
        assert r.status_code == 403 and "evil.example" in r.json()["error"]
        assert await stored(api) == NOTHING
        before = (await api.get("/v1/config")).json()
        r = await api.put("/v1/config", json={"mode": "enhanced" if before["mode"] == "fast" else "fast"},
                          headers=evil)
        assert r.status_code == 403 and (await api.get("/v1/config")).json()["mode"] == before["mode"]
        # a read from elsewhere is answered, but carries no CORS header: a browser will not show it to the page
        r = await api.get("/v1/config", headers=evil)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        assert (await api.options("/v1/uploads", headers={**evil, **preflight})).status_code == 400
        # the page itself (same origin) and a listed origin are let through
        r = await post(api, [("a.jpg", make_jpeg(), "image/jpeg")], **{})
        assert r.status_code == 201
        r = await api.post("/v1/uploads", data=FIELDS, files=[("files", ("b.jpg", make_jpeg(40, 30), "image/jpeg"))],
                           headers={"Origin": "http://api"})
        assert r.status_code == 201, r.text
        # an opaque origin: allowed only when the browser says the request is same-origin (our own page under
        # its no-referrer policy sends "null"); a sandboxed frame elsewhere is refused
        r = await api.put("/v1/config", json={"mode": before["mode"]},
                          headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 200
        for site in ("cross-site", "same-site", None):
            r = await api.put("/v1/config", json={"mode": before["mode"]},
                              headers={"Origin": "null", **({"Sec-Fetch-Site": site} if site else {})})
            assert r.status_code == 403, site
        r = await api.put("/v1/config", json={"mode": before["mode"]}, headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403
        r = await api.options("/v1/uploads", headers={"Origin": "https://dash.example.org", **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://dash.example.org"
        r = await api.put("/v1/config", json={"mode": before["mode"]}, headers={"Origin": "https://dash.example.org"})
        assert r.status_code == 200


def _multipart(fields: dict[str, str], files: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    out = b""
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    for name, data in files:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


async def test_a_slow_sender_is_cut_off_with_408_and_nothing_is_stored(pg_dsn, tmp_path):
    async with api_client(pg_dsn, tmp_path, request_body_timeout_s=1.0) as api:
        body = _multipart(FIELDS, [("slow.jpg", make_jpeg())])
        headers = {"content-type": "multipart/form-data; boundary=b0undary"}

        async def trickle():
            yield body[:100]
            await asyncio.sleep(2.5)  # past the deadline: the rest never matters
            yield body[100:]

        r = await api.post("/v1/uploads", content=trickle(), headers=headers)
        assert r.status_code == 408 and "did not arrive within 1 s" in r.json()["error"]
        assert await stored(api) == NOTHING
        r = await api.post("/v1/uploads", content=body, headers=headers)  # the same body, sent at once
        assert r.status_code == 201, r.text


async def test_thousands_of_parts_are_refused(pg_dsn, tmp_path):
    async with api_client(pg_dsn, tmp_path) as api:
        headers = {"content-type": "multipart/form-data; boundary=b0undary"}
        many_fields = _multipart({**FIELDS, **{f"f{n}": "x" for n in range(5000)}}, [("a.jpg", make_jpeg())])
        r = await api.post("/v1/uploads", content=many_fields, headers=headers)
        assert r.status_code == 400 and "fields" in r.text.lower()
        tiny = make_jpeg(16, 16)
        many_files = _multipart(FIELDS, [(f"{n}.jpg", tiny) for n in range(3000)])
        r = await api.post("/v1/uploads", content=many_files, headers=headers)
        assert r.status_code in (400, 413) and "files" in r.text.lower()
        assert await stored(api) == NOTHING


METACHARACTERS = ["'; DROP TABLE images; --", "<script>alert(1)</script>", "${jndi:ldap://x/a}", "a\x00b",
                  "../../etc/passwd", "\" OR 1=1 --", "{{7*7}}", "%s%s%n"]
TEXT_FIELDS = ["site", "fallback_site", "camera", "captured_at", "fallback_captured_at", "cls", "detections",
               "sighting"]


@pytest.mark.parametrize("field", TEXT_FIELDS)
async def test_metacharacters_in_every_upload_field_are_refused_and_store_nothing(pg_dsn, tmp_path, field):
    async with api_client(pg_dsn, tmp_path) as api:
        for value in METACHARACTERS:
            r = await post(api, [("a.jpg", make_jpeg(), "image/jpeg")], **{field: value})
            assert 400 <= r.status_code < 500, (field, value, r.status_code, r.text)
            body = r.json()
            assert body.get("error") or body.get("detail"), body  # a reason, not a bare status
            assert await stored(api) == NOTHING, (field, value)


async def test_metacharacters_in_a_file_name_are_refused_or_kept_as_plain_text(pg_dsn, tmp_path):
    async with api_client(pg_dsn, tmp_path) as api:
        for value in METACHARACTERS:
            r = await post(api, [(value + ".jpg", make_jpeg(), "image/jpeg")])
            if r.status_code >= 400:  # path parts and control characters
                assert "plain file name" in r.json()["error"] and await stored(api) == NOTHING, value
                continue
            # any other name is only a name: stored as the text it is, and given back the same
            name = r.json()["images"][0]["name"]
            assert await api.pool.fetchval("SELECT original_name FROM images") == name
            await api.pool.execute("TRUNCATE images, detections, outbox CASCADE")
            for blob in [p for p in api.settings.blobs.rglob("*") if p.is_file()]:
                blob.unlink()
        assert await api.pool.fetchval("SELECT count(*) FROM images") == 0  # the table is still there


@pytest.mark.parametrize("edit", [{"name": "<script>alert(1)</script>"}, {"name": "bell\x07"},
                                  {"tags": ["<b>"]}, {"tags": ["a;b"]}, {"notes": "n" * 10001},
                                  {"reason": "r" * 2001, "notes": "ok"}, {"colour": "red"}])
async def test_hostile_edits_of_an_individual_are_refused_before_anything_runs(pg_dsn, tmp_path, edit):
    async with api_client(pg_dsn, tmp_path) as api:
        r = await api.patch("/v1/individuals/1", json=edit)
        assert r.status_code == 422, r.text
        reasons = r.json()["detail"]  # the reason, naming the field it refuses
        assert reasons and reasons[0]["msg"] and set(reasons[0]["loc"]) & (set(edit) | {"body"}), reasons


async def test_ingest_waits_out_the_rate_limit_instead_of_failing(pg_dsn, tmp_path):
    from deer_reid.ingest import Item, upload_one

    async with api_client(pg_dsn, tmp_path, rate_limit_per_s=1, rate_limit_burst=1) as api:
        items = [Item(f"{n}.jpg", f"{n}.jpg", make_jpeg(32 + n, 24)) for n in range(3)]
        started = asyncio.get_running_loop().time()
        answers = [await upload_one(api, item, FIELDS) for item in items]
        assert [a["status"] for a in answers] == [201, 201, 201], answers
        assert asyncio.get_running_loop().time() - started >= 1.5  # it waited as told, twice
        assert (await stored(api))["images"] == 3
