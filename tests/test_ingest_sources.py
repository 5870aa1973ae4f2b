"""MegaDetector output and Camtrap DP packages ingested through the real API and database, the Camtrap
DP round trip into a fresh stack, and the page a newcomer opens first (headless Chromium)."""
from __future__ import annotations

import asyncio
import json
import urllib.parse

import asyncpg
import pytest
from PIL import Image

from deer_reid.cli import main
from tests.megadetector_tool import reencoded
from tests.stack_helpers import api_on_new_database, register, row_counts
from tests.test_sources import box, edit_csv, md_doc, write_package

pytestmark = pytest.mark.stack


def cli(monkeypatch, api_url: str, key: str, *argv: str) -> int:
    monkeypatch.setenv("DEER_API_URL", api_url)
    monkeypatch.setenv("DEER_API_KEY", key)
    return main([*argv])


@pytest.fixture
def fresh_api(stack, tmp_path_factory):
    """A second, empty deer-reid API on a database of its own (the stack's server, a new database), one per
    test: the other end of a round trip, and the stack a newcomer starts with (empty whatever ran before)."""
    with api_on_new_database(stack.dsn, tmp_path_factory.mktemp("fresh"), owner="newcomer") as api:
        yield api


def test_an_empty_stack_opens_on_how_to_bring_photos_in(fresh_api, browser):
    from selenium.webdriver.common.by import By

    browser.get(fresh_api["url"] + "/")  # the API's own address opens the page
    assert urllib.parse.urlsplit(browser.current_url).path == "/ui/"
    start = browser.find_element(By.ID, "start")
    for way, command in (("way-folder", "deer-reid ingest PHOTOS_DIR --site"),
                         ("way-megadetector", "--detections md_results.json"),
                         ("way-camtrap", "--camtrap-dp")):
        assert command in start.find_element(By.ID, way).text
    assert browser.find_element(By.ID, "api-docs").get_attribute("href").endswith("/docs")


async def test_megadetector_output_uploads_animal_boxes_and_skips_the_rest(stack, db, nyala_paths, tmp_path,
                                                                           monkeypatch, capsys):
    site = "md-north"
    await register(stack, site, "md-prop")
    folder = tmp_path / "cards"
    names = {"north/IMG_0001.JPG": 40, "north/IMG_0002.JPG": 41, "north/IMG_0003.JPG": 42,
             "north/empty.JPG": 43, "north/person.JPG": 44, "north/faint.JPG": 45, "north/no-entry.JPG": 46}
    for rel, i in names.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(reencoded(nyala_paths[i], f"md-test/{rel}"))
    other_machine = "D:\\trailcam\\2025\\north\\"  # a Windows path from the machine MegaDetector ran on
    doc = md_doc([
        {"file": other_machine + "IMG_0001.JPG", "detections": [box(bbox=(0.05, 0.05, 0.9, 0.9)), box("2", 0.97)]},
        {"file": "north/IMG_0002.JPG", "detections": [box(conf=0.6, bbox=(0.0, 0.0, 0.5, 1.0)),
                                                       box(conf=0.8, bbox=(0.5, 0.0, 0.5, 1.0))]},
        {"file": "north/IMG_0003.JPG", "detections": [box(bbox=(0.1, 0.1, 0.8, 0.8)), box(bbox=(1.2, 0, 0.1, 0.1))]},
        {"file": "north/empty.JPG", "detections": []},
        {"file": "north/person.JPG", "detections": [box("2", 0.95, (0.3, 0.1, 0.2, 0.8))]},
        {"file": "north/faint.JPG", "detections": [box(conf=0.1)]},
        {"file": "north/gone.JPG", "detections": [box()]},
        {"file": "../outside.JPG", "detections": [box()]},
    ])
    (tmp_path / "md.json").write_text(doc)
    before = await db.fetchval("SELECT count(*) FROM images")
    status = await asyncio.to_thread(cli, monkeypatch, stack.api_url, stack.admin_key, "ingest", str(folder),
                                     "--detections", str(tmp_path / "md.json"), "--site", site,
                                     "--captured-at", "2025-11-03T06:00:00Z", "--json", str(tmp_path / "r.json"),
                                     "--quiet")
    report = json.loads((tmp_path / "r.json").read_text())
    md = report["megadetector"]
    assert status == 1, report  # refused entries: a script around ingest must see them
    assert report["uploaded"] == 2 and report["submitted"] == 3 and report["rejected"] == []
    assert md["skipped_empty"] == 3 and md["images_without_entry"] == 1
    assert md["images_without_entry_first"] == ["north/no-entry.JPG"]
    refused = "\n".join(md["refused_entries"])
    assert "images[2]" in refused and "outside the image" in refused
    assert "images[6]" in refused and "no image" in refused
    assert "images[7]" in refused and "outside the folder" in refused
    assert md["never_uploaded"] == {"person": 2}
    assert await db.fetchval("SELECT count(*) FROM images") == before + 2
    rows = await db.fetch("""SELECT i.original_name, d.box, d.detector_confidence, i.width, i.height
                             FROM detections d JOIN images i ON i.sha256 = d.image_sha256
                             WHERE d.site = $1 ORDER BY i.original_name, d.ordinal""", site)
    w1, h1 = Image.open(folder / "north/IMG_0001.JPG").size
    w2, h2 = Image.open(folder / "north/IMG_0002.JPG").size
    assert [(r["original_name"], list(r["box"])) for r in rows] == [
        ("IMG_0001.JPG", [round(0.05 * w1), round(0.05 * h1), round(0.95 * w1), round(0.95 * h1)]),
        ("IMG_0002.JPG", [round(0.5 * w2), 0, w2, h2]),  # the more confident box first
        ("IMG_0002.JPG", [0, 0, round(0.5 * w2), h2])]
    assert [round(r["detector_confidence"], 2) for r in rows] == [0.9, 0.8, 0.6]
    # the person's frame never reached the stack, not even as an image
    person = (folder / "north/person.JPG").read_bytes()
    import hashlib
    assert not await db.fetchval("SELECT count(*) FROM images WHERE sha256 = $1", hashlib.sha256(person).hexdigest())
    # a file that is not MegaDetector output is refused whole, nothing sent
    (tmp_path / "not-md.json").write_text(json.dumps({"annotations": []}))
    capsys.readouterr()
    status = await asyncio.to_thread(cli, monkeypatch, stack.api_url, stack.admin_key, "ingest", str(folder),
                                     "--detections", str(tmp_path / "not-md.json"), "--site", site, "--quiet")
    assert status == 2 and "not MegaDetector batch output" in capsys.readouterr().err
    assert await db.fetchval("SELECT count(*) FROM images") == before + 2


async def test_camtrap_dp_package_ingests_with_bad_rows_named_and_the_rest_stored(stack, db, tmp_path, monkeypatch,
                                                                                 capsys):
    root = write_package(tmp_path / "pkg", seed="stack-bad-rows")

    def no_zone(row):
        if row["mediaID"] == "m2":
            row["timestamp"] = "2025-10-02T06:00:02"

    edit_csv(root / "media.csv", no_zone)
    status = await asyncio.to_thread(cli, monkeypatch, stack.api_url, stack.admin_key, "ingest", str(root),
                                     "--camtrap-dp", "--property", "ct-bad", "--json", str(tmp_path / "r.json"),
                                     "--quiet")
    report = json.loads((tmp_path / "r.json").read_text())
    assert status == 1
    assert any("media.csv row 3" in p for p in report["camtrap_dp"]["refused_rows"])
    assert report["uploaded"] == 2 and report["submitted"] == 2  # m1 (deer) and m3 (fox: no --taxon)
    sites = {r["name"]: r for r in await db.fetch("SELECT name, property, lat, lon FROM sites WHERE property = 'ct-bad'")}
    assert {n: (s["lat"], s["lon"]) for n, s in sites.items()} == {"north_ridge": (45.1, -93.2), "creek": (45.2, -93.1)}
    label = await db.fetchval("SELECT source_label FROM detections WHERE site = 'north_ridge' AND property = 'ct-bad'")
    assert label == "buck-3"
    # a package without its media table is refused whole, before anything is sent
    broken = write_package(tmp_path / "broken", drop="media", seed="stack-broken")
    before = await row_counts(stack.dsn, ("images", "detections", "sites"))
    capsys.readouterr()
    status = await asyncio.to_thread(cli, monkeypatch, stack.api_url, stack.admin_key, "ingest", str(broken),
                                     "--camtrap-dp", "--property", "ct-broken", "--quiet")
    assert status == 2 and "resource 'media' is missing" in capsys.readouterr().err
    assert await row_counts(stack.dsn, ("images", "detections", "sites")) == before


async def identity_of_media(dsn: str, prop: str) -> dict:
    """What a Camtrap DP round trip must keep: sites, media and their times, boxes, sightings."""
    conn = await asyncpg.connect(dsn)
    try:
        sites = {r["name"]: (r["lat"], r["lon"]) for r in
                 await conn.fetch("SELECT name, lat, lon FROM sites WHERE property = $1", prop)}
        rows = await conn.fetch("""SELECT d.image_sha256, d.ordinal, d.box, d.site, d.camera, d.captured_at, d.sighting
                                   FROM detections d WHERE d.property = $1""", prop)
    finally:
        await conn.close()
    groups: dict = {}
    for r in rows:
        if r["sighting"] is not None:
            groups.setdefault(r["sighting"], set()).add(r["image_sha256"])
    return {"sites": sites,
            "media": {r["image_sha256"]: (r["site"], r["camera"], r["captured_at"]) for r in rows},
            "boxes": sorted((r["image_sha256"], r["ordinal"], tuple(r["box"])) for r in rows),
            "sightings": sorted(sorted(g) for g in groups.values())}


async def test_camtrap_dp_export_then_ingest_into_a_fresh_stack_keeps_sites_media_boxes_and_sightings(
        stack, db, fresh_api, nyala_paths, tmp_path, monkeypatch):
    prop = "ct-trip"
    await register(stack, "trip-north", prop, 45.5, -93.5)
    await register(stack, "trip-creek", prop, 45.6, -93.4)
    from deer_reid.ingest import Item, upload_all

    def item(i: int, site: str, when: str, sighting: str | None, boxes: list | None = None) -> Item:
        fields = {"site": site, "camera": "cam-a", "captured_at": when}
        if sighting:
            fields["sighting"] = sighting
        if boxes:
            fields["detections"] = json.dumps(boxes)
        return Item(f"photo {i}", f"trip-{i}.jpg", reencoded(nyala_paths[i], f"trip/{i}"), fields=fields)

    items = [item(60, "trip-north", "2025-10-05T06:00:00Z", "burst-1"),
             item(61, "trip-north", "2025-10-05T06:00:02Z", "burst-1"),
             item(62, "trip-north", "2025-10-06T07:00:00+02:00", None, [{"box": [10, 20, 200, 300]},
                                                                          {"box": [210, 20, 400, 300]}]),
             item(63, "trip-creek", "2025-10-07T05:30:00Z", "burst-9")]
    results = await upload_all(stack.api_url, items, {}, progress=False, headers=stack.auth)
    assert all("detections" in r for r in results), results
    out = tmp_path / "package"
    assert await asyncio.to_thread(cli, monkeypatch, stack.api_url, stack.admin_key, "export", str(out),
                                   "--format", "camtrap-dp", "--property", prop, "--with-media") == 0
    assert len(list((out / "media").rglob("*"))) >= 4
    status = await asyncio.to_thread(cli, monkeypatch, fresh_api["url"], fresh_api["key"], "ingest", str(out),
                                     "--camtrap-dp", "--property", prop, "--json", str(tmp_path / "r.json"), "--quiet")
    assert status == 0, (tmp_path / "r.json").read_text()
    before, after = await identity_of_media(stack.dsn, prop), await identity_of_media(fresh_api["dsn"], prop)
    assert len(before["media"]) == 4 and len(before["boxes"]) == 5 and len(before["sightings"]) == 2
    assert after == before
