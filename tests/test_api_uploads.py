"""The upload API against the real database: good uploads stored once, hostile ones refused with nothing stored."""
from __future__ import annotations

import contextlib
import io
import json
import zlib

import asyncpg
import httpx
import pytest
from PIL import Image

from services.api.app import create_app
from services.api.auth import create_key
from shared.config import Settings
from shared.db import create_pool
from tests.conftest import make_jpeg, tar_of, zip_of




@contextlib.asynccontextmanager
async def api_client(pg_dsn, home, **settings):
    """The FastAPI app with `settings` on a clean database, driven in-process through httpx as an admin."""
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("TRUNCATE images, detections, outbox, embeddings, individuals CASCADE")
    await conn.close()
    settings = Settings(home=home, database_url=pg_dsn, **settings)
    app = create_app(settings)
    app.state.pool = await create_pool(pg_dsn)
    try:
        _, key = await create_key(app.state.pool, "ranger", "admin")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                     headers={"Authorization": f"Bearer {key}"}) as client:
            client.settings = settings
            client.pool = app.state.pool
            yield client
    finally:
        await app.state.pool.close()


@pytest.fixture
async def api(pg_dsn, tmp_path):
    async with api_client(pg_dsn, tmp_path, max_upload_bytes=50 * 1024 * 1024) as client:
        yield client


async def stored(client) -> dict:
    pool = client.pool
    counts = {t: await pool.fetchval(f"SELECT count(*) FROM {t}") for t in ("images", "detections", "outbox")}
    blobs = client.settings.blobs
    counts["blobs"] = sum(1 for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else 0
    return counts


NOTHING = {"images": 0, "detections": 0, "outbox": 0, "blobs": 0}
FIELDS = {"site": "ridge", "camera": "cam1", "captured_at": "2025-11-01T06:00:00Z"}


async def post(client, files, **fields):
    data = {**FIELDS, **fields}
    data = {k: v for k, v in data.items() if v is not None}
    return await client.post("/v1/uploads", data=data, files=[("files", f) for f in files])


async def test_upload_stores_image_detection_and_outbox_once(api, jpeg_bytes):
    r = await post(api, [("a.jpg", jpeg_bytes, "image/jpeg")], cls="doe")
    assert r.status_code == 201, r.text
    image = r.json()["images"][0]
    assert image["duplicate"] is False and len(image["detections"]) == 1
    assert await stored(api) == {"images": 1, "detections": 1, "outbox": 1, "blobs": 1}
    det = (await api.get(f"/v1/detections/{image['detections'][0]['id']}")).json()
    assert det["state"] == "received" and det["cls"] == "doe" and det["site"] == "ridge"

    again = await post(api, [("renamed.jpg", jpeg_bytes, "image/jpeg")])
    assert again.status_code == 200
    assert again.json()["images"][0]["duplicate"] is True
    assert again.json()["images"][0]["detections"] == image["detections"]
    assert await stored(api) == {"images": 1, "detections": 1, "outbox": 1, "blobs": 1}


async def test_boxes_become_detections(api, jpeg_bytes):
    w, h = Image.open(io.BytesIO(jpeg_bytes)).size
    boxes = [{"box": [0, 0, w // 2, h // 2], "cls": "buck", "confidence": 0.9},
             {"box": [w // 2, h // 2, w, h], "cls": "fawn"}]
    r = await post(api, [("a.jpg", jpeg_bytes, "image/jpeg")], detections=json.dumps(boxes))
    assert r.status_code == 201, r.text
    ids = [d["id"] for d in r.json()["images"][0]["detections"]]
    assert len(ids) == 2
    det = (await api.get(f"/v1/detections/{ids[0]}")).json()
    assert det["box"] == [0, 0, w // 2, h // 2] and det["cls"] == "buck"


async def test_time_from_file_name_and_fallback(api, jpeg_bytes):
    r = await post(api, [("north-1_20251102_071530.jpg", jpeg_bytes, "image/jpeg")], site=None, captured_at=None)
    assert r.status_code == 201, r.text
    img = r.json()["images"][0]
    assert img["time_source"] == "file name" and img["captured_at"].startswith("2025-11-02T07:15:30")
    other = make_jpeg(80, 60)
    r = await post(api, [("x.jpg", other, "image/jpeg")], captured_at=None,
                   fallback_captured_at="2025-10-01T00:00:00Z")
    assert r.json()["images"][0]["time_source"] == "fallback"


def _exif_jpeg(when: str) -> bytes:
    im = Image.new("RGB", (64, 64), (10, 20, 30))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = when
    out = io.BytesIO()
    im.save(out, format="JPEG", exif=exif)
    return out.getvalue()


async def test_exif_time_beats_file_name(api):
    r = await post(api, [("north_20251102_071530.jpg", _exif_jpeg("2024:06:01 12:00:00"), "image/jpeg")],
                   captured_at=None)
    img = r.json()["images"][0]
    assert img["time_source"] == "exif" and img["captured_at"].startswith("2024-06-01T12:00:00")


def _bomb_png(side: int = 20000) -> bytes:
    """A tiny PNG that declares side x side pixels: a decompression bomb."""
    import struct

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    row = b"\0" + b"\0" * (side * 3)
    body = zlib.compress(row * 64, 9)  # only a few rows: the size is in the header
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


HOSTILE = {
    "not an image": ([("a.jpg", b"hello, I am text", "image/jpeg")], {}, 422, "not a decodable image"),
    "zero bytes": ([("a.jpg", b"", "image/jpeg")], {}, 422, "empty"),
    "gif": ([("a.gif", b"GIF89a\x10\x00\x10\x00\x00\x00\x00;", "image/gif")], {}, None, ""),
    "bomb": ([("a.png", _bomb_png(), "image/png")], {}, 413, "pixels"),
    "wrong class": (None, {"cls": "elk"}, 422, ""),
    "box outside": (None, {"detections": json.dumps([{"box": [0, 0, 5000, 50]}])}, 422, "outside"),
    "negative box": (None, {"detections": json.dumps([{"box": [-5, 0, 50, 50]}])}, 422, "box"),
    "box class": (None, {"detections": json.dumps([{"box": [0, 0, 50, 50], "cls": "moose"}])}, 422, "cls"),
    "detections junk": (None, {"detections": "{not json"}, 422, "detections"),
    "missing time": (None, {"captured_at": None}, 422, "capture time unknown"),
    "absurd time": (None, {"captured_at": "1850-01-01T00:00:00Z"}, 422, "not plausible"),
    "future time": (None, {"captured_at": "2999-01-01T00:00:00Z"}, 422, "not plausible"),
    "naive time": (None, {"captured_at": "2025-01-01T00:00:00"}, 422, "time zone"),
    "garbage time": (None, {"captured_at": "yesterday"}, 422, "ISO-8601"),
    "missing site": (None, {"site": None}, 422, "site missing"),
    "hostile site": (None, {"site": "../../etc"}, 422, "site"),
    "path in name": ([("../../etc/passwd.jpg", None, "image/jpeg")], {}, 422, "plain file name"),
    "backslash name": ([("..\\..\\boot.jpg", None, "image/jpeg")], {}, 422, "plain file name"),
    "hidden name": ([(".htaccess", None, "image/jpeg")], {}, 422, "plain file name"),
    # archives: one refused entry refuses the upload (an upload is all or nothing)
    "zip climbing entry": ([("card.zip", zip_of({"ok.jpg": make_jpeg(), "../../evil.jpg": make_jpeg()}),
                             "application/zip")], {}, 422, "climbs"),
    "tar absolute entry": ([("card.tar.gz", tar_of({"/etc/cron.d/x.jpg": make_jpeg()}), "application/gzip")], {},
                           422, "absolute"),
    "tar symlink": ([("card.tar", tar_of({}, "w", links={"a.jpg": "/etc/shadow"}), "application/x-tar")], {}, 422,
                    "link"),
    "zip bomb": ([("card.zip", lambda: zip_of({"b.jpg": b"\0" * (8 * 1024 * 1024)}), "application/zip")], {}, 413,
                 "zip bomb"),
    "tar bomb": ([("card.tgz", lambda: tar_of({f"{n}.jpg": b"\0" * (40 * 1024 * 1024) for n in range(8)}),
                   "application/gzip")], {}, 413, ""),
    "nested archive": ([("card.zip", zip_of({"inner.zip": zip_of({"a.jpg": make_jpeg()})}), "application/zip")],
                       {}, 422, "not opened"),
    "archive of text": ([("card.zip", zip_of({"notes.txt": b"hello"}), "application/zip")], {}, 422,
                        "not an image"),
    "zip not a zip": ([("card.zip", b"PK\x03\x04 nope", "application/zip")], {}, 422, "not a readable"),
    "archive with a bad image": ([("card.zip", zip_of({"a.jpg": make_jpeg(), "b.jpg": b"junk"}),
                                   "application/zip")], {}, 422, "not a decodable image"),
    "too many images in an archive": ([("card.zip", zip_of({f"{n}.jpg": make_jpeg() for n in range(65)}),
                                        "application/zip")], {}, 413, "images in one upload"),
    "two entries one name": ([("card.zip", zip_of({"a/x.jpg": make_jpeg(), "b/x.jpg": make_jpeg()}),
                               "application/zip")], {}, 422, "same name"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_uploads_get_a_clear_4xx_and_store_nothing(api, jpeg_bytes, case):
    files, fields, status, text = HOSTILE[case]
    files = [(n, jpeg_bytes if b is None else b() if callable(b) else b, m)  # big ones are built when used
             for n, b, m in (files or [("a.jpg", None, "image/jpeg")])]
    r = await post(api, files, **fields)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status:
        assert r.status_code == status, r.text
    body = r.json()
    message = body.get("error") or json.dumps(body.get("detail"))
    assert text.lower() in message.lower(), message
    assert await stored(api) == NOTHING


async def test_an_archive_upload_stores_its_images(api, jpeg_bytes):
    """A zip of a card (folders, a macOS metadata file) is its images; names carry site and time as files do."""
    card = zip_of({"cam1/ridge_20251101_060000.jpg": jpeg_bytes, "cam1/ridge_20251101_060130.jpg": make_jpeg(),
                   "__MACOSX/cam1/._ridge_20251101_060000.jpg": b"\0\5\x16\7"})
    r = await post(api, [("card.zip", card, "application/zip")], site=None, captured_at=None)
    assert r.status_code == 201, r.text
    images = r.json()["images"]
    assert sorted(i["name"] for i in images) == ["ridge_20251101_060000.jpg", "ridge_20251101_060130.jpg"]
    assert await stored(api) == {"images": 2, "detections": 2, "outbox": 2, "blobs": 2}
    rows = await api.pool.fetch("SELECT site, captured_at FROM images ORDER BY captured_at")
    assert [r["site"] for r in rows] == ["ridge", "ridge"] and rows[1]["captured_at"].minute == 1


async def test_truncated_jpeg_is_refused(api, jpeg_bytes):
    r = await post(api, [("a.jpg", jpeg_bytes[: len(jpeg_bytes) // 2], "image/jpeg")])
    assert r.status_code == 422 and "truncated" in r.json()["error"]
    assert await stored(api) == NOTHING


async def test_sixty_megabytes_is_refused(api):
    big = b"\xff\xd8\xff\xe0" + b"\0" * (60 * 1024 * 1024)
    r = await post(api, [("big.jpg", big, "image/jpeg")])
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert await stored(api) == NOTHING


async def test_one_bad_file_refuses_the_whole_upload(api, jpeg_bytes):
    r = await post(api, [("good.jpg", jpeg_bytes, "image/jpeg"), ("bad.jpg", b"junk", "image/jpeg")])
    assert r.status_code == 422 and r.json()["file"] == "bad.jpg"
    assert await stored(api) == NOTHING


async def test_unknown_detection_is_404(api):
    r = await api.get("/v1/detections/00000000-0000-0000-0000-000000000000")
    assert r.status_code == 404
    assert (await api.get("/v1/detections/not-a-uuid")).status_code == 422


@pytest.mark.parametrize("name", ["a\x07b.jpg", "a\x00.jpg", "x/../y.jpg", "..", "C:\\evil.jpg", "n" * 300, ""])
def test_safe_file_name_refuses_tricks(name):
    from services.api.uploads import UploadRejected, safe_file_name

    with pytest.raises(UploadRejected):
        safe_file_name(name)


async def test_control_characters_in_a_raw_multipart_name_are_refused(api, jpeg_bytes):
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"site\"\r\n\r\nridge\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"captured_at\"\r\n\r\n2025-11-01T06:00:00Z\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\x07b.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg_bytes + f"\r\n--{boundary}--\r\n".encode()
    r = await api.post("/v1/uploads", content=body,
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 422 and "plain file name" in r.json()["error"]
    assert await stored(api) == NOTHING


async def test_run_time_config_switches_mode_and_keeps_history(api):
    assert (await api.get("/v1/config")).json()["mode"] == "fast"
    # the change is recorded under the key's owner, not under a header anyone can set
    r = await api.put("/v1/config", json={"mode": "enhanced"}, headers={"x-user": "mallory"})
    assert r.status_code == 200 and r.json()["mode"] == "enhanced" and r.json()["updated_by"] == "ranger"
    for bad in ({"mode": "turbo"}, {"mode": "fast", "extra": 1}, {"mode": None}):
        assert (await api.put("/v1/config", json=bad)).status_code == 422
    r = await api.put("/v1/config", json={"mode": "fast"})
    assert r.json()["mode"] == "fast"
    history = await api.pool.fetch("SELECT value->>'mode' AS mode FROM runtime_config_history ORDER BY id")
    assert [h["mode"] for h in history][-2:] == ["enhanced", "fast"]


async def test_each_enhancement_switches_on_its_own_and_the_rest_stay(api):
    before = (await api.get("/v1/config")).json()
    assert {k: before[k] for k in ("ensemble", "temporal", "coat", "pose", "antler")} == \
        {"ensemble": True, "temporal": True, "coat": False, "pose": False, "antler": False}
    try:
        r = (await api.put("/v1/config", json={"temporal": False})).json()
        assert r["temporal"] is False and r["mode"] == before["mode"] and r["ensemble"] is True
        r = (await api.put("/v1/config", json={"coat": True, "antler": True})).json()
        assert (r["temporal"], r["coat"], r["antler"]) == (False, True, True)
        assert (await api.put("/v1/config", json={"temporal": None})).status_code == 422
        assert (await api.put("/v1/config", json={"temporal": "yes please"})).status_code == 422
    finally:
        await api.put("/v1/config", json={"temporal": True, "coat": False, "antler": False})
    last = await api.pool.fetchval("SELECT value FROM runtime_config_history ORDER BY id DESC LIMIT 1")
    assert last["temporal"] is True and last["coat"] is False


async def test_oversized_requests_and_too_many_parts_are_refused_before_parsing(pg_dsn, tmp_path, jpeg_bytes):
    """The whole request is bounded (413 before parsing), and so are the multipart parts."""
    async with api_client(pg_dsn, tmp_path, max_request_bytes=64 * 1024, max_files_per_upload=4) as c:
        big = make_jpeg(64, 48) + b"\0" * (80 * 1024)
        r = await post(c, [("big.jpg", big, "image/jpeg")])
        assert r.status_code == 413, r.text
        small = make_jpeg(32, 24)
        r = await post(c, [(f"{n}.jpg", small, "image/jpeg") for n in range(5)])
        assert r.status_code in (400, 413) and "files" in r.text.lower(), r.text
        r = await c.post("/v1/uploads", data={**FIELDS, **{f"extra{n}": "x" for n in range(40)}},
                         files=[("files", ("a.jpg", small, "image/jpeg"))])
        assert r.status_code == 400 and "fields" in r.text.lower(), r.text
        r = await c.post("/v1/uploads", data={**FIELDS, "detections": "[" + " " * (2 * 1024 * 1024) + "]"},
                         files=[("files", ("a.jpg", small, "image/jpeg"))])
        assert r.status_code in (400, 413), r.status_code
        # the people's API takes JSON up to 2 MB (10,000 detection ids in a split), no more
        r = await c.post("/v1/individuals/merge", content=b'{"keep": 1, "absorb": 2, "reason": "'
                         + b"x" * (3 * 1024 * 1024) + b'"}', headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert await stored(c) == NOTHING
