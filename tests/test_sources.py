"""MegaDetector output and Camtrap DP packages read into boxes (pure), and `deer-reid doctor`'s verdicts.
Fixtures are written here from the published formats, never copied from anywhere."""
from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest

from deer_reid.ingest_sources import pixel_boxes
from deer_reid.sources import camtrap, megadetector


def md_doc(images: list[dict], version: str = "1.4", categories: dict | None = None, **info) -> str:
    doc = {"info": {"format_version": version, "detector": "md_v5a.0.0.pt", **info}, "images": images}
    if categories is not False:
        doc["detection_categories"] = categories or {"1": "animal", "2": "person", "3": "vehicle"}
    return json.dumps(doc)


def box(category="1", conf=0.9, bbox=(0.1, 0.2, 0.5, 0.6)) -> dict:
    return {"category": category, "conf": conf, "bbox": list(bbox)}


# --- MegaDetector -------------------------------------------------------------------------------------

def test_megadetector_keeps_animal_boxes_above_the_threshold_and_never_people():
    r = megadetector.parse(md_doc([
        {"file": "cam1/a.jpg", "detections": [box(), box(conf=0.1), box("2", 0.99)]},
        {"file": "cam1/empty.jpg", "detections": []},
        {"file": "cam1/person.jpg", "detections": [box("2", 0.95), box("3", 0.8)]},
        {"file": "cam1/broken.jpg", "failure": "Failure image access", "detections": None},
    ]), min_conf=0.2)
    a, empty, person, broken = r.entries
    assert r.format_version == "1.4" and r.detector == "md_v5a.0.0.pt"
    assert [(b.x, b.y, b.w, b.h, b.conf) for b in a.animals] == [(0.1, 0.2, 0.5, 0.6, 0.9)]
    assert a.below_threshold == 1 and a.others == {"person": 1}
    assert empty.animals == [] and empty.error is None
    assert person.animals == [] and person.others == {"person": 1, "vehicle": 1}
    assert "detector failed" in broken.error and "Failure image access" in broken.error


def test_megadetector_old_files_without_categories_and_with_max_detection_conf():
    old = json.dumps({"images": [{"file": "x.jpg", "max_detection_conf": 0.8,
                                  "detections": [box("1", 0.8), box("2", 0.7)]}]})
    r = megadetector.parse(old)
    assert r.format_version == "1.0" and len(r.entries[0].animals) == 1 and r.entries[0].others == {"person": 1}
    # categories are read by name: a file that numbers animals differently is read as it says
    r = megadetector.parse(md_doc([{"file": "x.jpg", "detections": [box("7"), box("1")]}],
                                  categories={"7": "Animal", "1": "person"}))
    assert len(r.entries[0].animals) == 1 and r.entries[0].others == {"person": 1}


@pytest.mark.parametrize("text, message", [
    ("not json at all", "not JSON"),
    (json.dumps([{"file": "a.jpg", "detections": []}]), "expected an object with an `images` list"),
    (json.dumps({"info": {"format_version": "2.0"}, "images": []}), "format_version 2.0"),
    (json.dumps({"images": [], "detection_categories": {"1": ""}}), "detection_categories"),
])
def test_megadetector_refuses_what_is_not_its_output(text, message):
    with pytest.raises(megadetector.MegaDetectorError, match=message):
        megadetector.parse(text)


@pytest.mark.parametrize("detection, message", [
    (box(bbox=(0.5, 0.5, 0.6, 0.2)), "outside the image"),
    (box(bbox=(-0.2, 0.1, 0.3, 0.3)), "outside the image"),
    (box(bbox=(0.1, 0.1, -0.3, 0.3)), "not positive"),
    (box(bbox=(0.1, 0.1, 0.3)), "four numbers"),
    (box(conf=1.5), "conf 1.5"),
    (box(conf="high"), "conf 'high'"),
    ({"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, float("nan"), 0.3]}, "four numbers"),
])
def test_megadetector_refuses_a_bad_box_by_entry_and_reads_the_rest(detection, message):
    r = megadetector.parse(md_doc([{"file": "bad.jpg", "detections": [box(), detection]},
                                   {"file": "good.jpg", "detections": [box()]}]))
    bad, good = r.entries
    assert message in bad.error and "images[0]" in bad.error and "bad.jpg" in bad.error and bad.animals == []
    assert good.error is None and len(good.animals) == 1


def test_megadetector_refuses_paths_out_of_the_folder_videos_and_oversized_files(monkeypatch):
    r = megadetector.parse(md_doc([{"file": "../../etc/passwd", "detections": [box()]},
                                   {"file": "clip.mp4", "frame_rate": 20, "detections": [box()]},
                                   {"detections": []}]))
    up, video, nameless = r.entries
    assert "outside the folder" in up.error and "video" in video.error and "no `file`" in nameless.error
    monkeypatch.setattr(megadetector, "MAX_JSON_BYTES", 1000)
    with pytest.raises(megadetector.MegaDetectorError, match="over"):
        megadetector.parse(md_doc([{"file": f"{i}.jpg", "detections": []} for i in range(100)]))


def test_megadetector_paths_from_another_machine_match_by_their_part_below_the_folder():
    entries = megadetector.parse(md_doc([
        {"file": "C:\\Users\\ranger\\cams\\north\\IMG_0001.JPG", "detections": [box()]},
        {"file": "/mnt/data/cams/south/IMG_0001.JPG", "detections": [box()]},
        {"file": "IMG_0001.JPG", "detections": [box()]},  # which camera's? ambiguous
        {"file": "north/IMG_0009.JPG", "detections": [box()]},  # not in the folder
        {"file": "south/IMG_0002.jpg", "detections": [box()]},
    ])).entries
    matched, unnamed = megadetector.match(entries, ["north/IMG_0001.JPG", "south/IMG_0001.JPG",
                                                    "south/IMG_0002.JPG", "south/IMG_0003.JPG"])
    assert matched == {0: "north/IMG_0001.JPG", 1: "south/IMG_0001.JPG", 4: "south/IMG_0002.JPG"}
    assert "several images" in entries[2].error and "no image" in entries[3].error
    assert unnamed == ["south/IMG_0003.JPG"]


def test_boxes_become_the_api_pixel_boxes_clipped_and_small_ones_counted():
    dets, small = pixel_boxes([((0.1, 0.2, 0.5, 0.6), 0.9, None), ((0.9, 0.9, 0.1005, 0.1), 0.8, "N-12"),
                               ((0.0, 0.0, 0.001, 0.5), 0.95, None)], 400, 300, "doe")
    assert small == 1
    assert dets == [{"box": [40, 60, 240, 240], "cls": "doe", "confidence": 0.9},
                    {"box": [360, 270, 400, 300], "cls": "doe", "confidence": 0.8, "label": "N-12"}]


# --- Camtrap DP ---------------------------------------------------------------------------------------

def distinct_jpeg(width: int, height: int, seed: str) -> bytes:
    """A JPEG no other test uploads (the stack keeps one copy of each image, by content)."""
    import hashlib
    import io

    from PIL import Image

    colour = tuple(hashlib.sha256(seed.encode()).digest()[:3])
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="JPEG", comment=seed.encode())
    return out.getvalue()


def write_package(root: Path, *, deployments=None, media=None, observations=None, drop: str | None = None,
                  seed: str = "") -> Path:
    """A small Camtrap DP 1.0.2 package: two deployments, three images, their observations."""
    from services.api.exports import CAMTRAP_FIELDS

    root.mkdir(parents=True, exist_ok=True)
    (root / "media").mkdir(exist_ok=True)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (root / "media" / name).write_bytes(distinct_jpeg(200, 100, f"{seed}/{name}"))
    deployments = deployments or [
        {"deploymentID": "dep1", "locationID": "north ridge", "latitude": "45.1", "longitude": "-93.2",
         "deploymentStart": "2025-10-01T00:00:00Z", "deploymentEnd": "2025-11-01T00:00:00Z", "cameraID": "cam-7"},
        {"deploymentID": "dep2", "locationID": "creek", "latitude": "45.2", "longitude": "-93.1",
         "deploymentStart": "2025-10-01T00:00:00Z", "deploymentEnd": "2025-11-01T00:00:00Z"}]
    media = media or [
        {"mediaID": "m1", "deploymentID": "dep1", "timestamp": "2025-10-02T06:00:00Z", "filePath": "media/a.jpg",
         "filePublic": "false", "fileName": "a.jpg", "fileMediatype": "image/jpeg"},
        {"mediaID": "m2", "deploymentID": "dep1", "timestamp": "2025-10-02T06:00:02+01:00",
         "filePath": "media/b.jpg", "filePublic": "false", "fileMediatype": "image/jpeg"},
        {"mediaID": "m3", "deploymentID": "dep2", "timestamp": "2025-10-03T07:00:00Z", "filePath": "media/c.jpg",
         "filePublic": "false", "fileMediatype": "image/jpeg"}]
    common = {"eventStart": "2025-10-02T06:00:00Z", "eventEnd": "2025-10-02T06:00:02Z", "observationLevel": "media",
              "observationType": "animal", "scientificName": "Odocoileus virginianus"}
    observations = observations or [
        {"observationID": "o1", "deploymentID": "dep1", "mediaID": "m1", "eventID": "ev-1", **common,
         "individualID": "buck-3", "bboxX": "0.1", "bboxY": "0.1", "bboxWidth": "0.5", "bboxHeight": "0.6"},
        {"observationID": "o2", "deploymentID": "dep1", "mediaID": "m2", "eventID": "ev-1", **common,
         "bboxX": "0.2", "bboxY": "0.1", "bboxWidth": "0.5", "bboxHeight": "0.6"},
        {"observationID": "o3", "deploymentID": "dep2", "mediaID": "m3", **common, "scientificName": "Vulpes vulpes",
         "bboxX": "0.2", "bboxY": "0.1", "bboxWidth": "0.5", "bboxHeight": "0.6"},
        {"observationID": "o4", "deploymentID": "dep2", "mediaID": "m3", **common, "observationLevel": "event"},
        {"observationID": "o5", "deploymentID": "dep2", "mediaID": "m3", **common}]
    for name, rows in (("deployments", deployments), ("media", media), ("observations", observations)):
        with open(root / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, CAMTRAP_FIELDS[f"{name}.csv"], restval="")
            w.writeheader()
            w.writerows(rows)
    base = "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2"
    package = {
        "profile": f"{base}/camtrap-dp-profile.json", "name": "test-package", "created": "2025-11-02T00:00:00Z",
        "contributors": [{"title": "a ranger", "role": "contact"}],
        "project": {"title": "t", "samplingDesign": "opportunistic", "captureMethod": ["activityDetection"],
                    "individualAnimals": True, "observationLevel": ["media"]},
        "spatial": {"type": "Polygon", "coordinates": [[[-93.2, 45.1], [-93.1, 45.1], [-93.1, 45.2], [-93.2, 45.2],
                                                         [-93.2, 45.1]]]},
        "temporal": {"start": "2025-10-01", "end": "2025-11-01"},
        "taxonomic": [{"scientificName": "Odocoileus virginianus"}],
        "resources": [{"name": n, "path": f"{n}.csv", "profile": "tabular-data-resource", "format": "csv",
                       "mediatype": "text/csv", "encoding": "utf-8", "schema": f"{base}/{n}-table-schema.json"}
                      for n in ("deployments", "media", "observations") if n != drop]}
    (root / "datapackage.json").write_text(json.dumps(package))
    return root


def test_camtrap_package_reads_into_sites_media_boxes_events_and_labels(tmp_path):
    pkg = camtrap.read(write_package(tmp_path / "p"))
    assert pkg.problems == []
    assert {(d.id, d.site, d.camera, d.lat, d.lon) for d in pkg.deployments.values()} == \
        {("dep1", "north_ridge", "cam-7", 45.1, -93.2), ("dep2", "creek", "dep2", 45.2, -93.1)}
    assert pkg.media["m2"].timestamp.utcoffset().total_seconds() == 3600
    assert [(o.media, o.event, o.individual) for o in pkg.observations] == \
        [("m1", "ev-1", "buck-3"), ("m2", "ev-1", None), ("m3", None, None)]
    assert pkg.skipped == {"event-level (no box)": 1, "no bounding box": 1}
    deer = camtrap.read(tmp_path / "p", taxon="odocoileus VIRGINIANUS")
    assert [o.media for o in deer.observations] == ["m1", "m2"] and deer.skipped["another taxon"] == 1


def test_camtrap_package_without_a_resource_is_refused_with_the_validators_messages(tmp_path):
    with pytest.raises(camtrap.PackageRefused) as refused:
        camtrap.read(write_package(tmp_path / "p", drop="media"))
    assert any("resource 'media' is missing" in m for m in refused.value.messages)
    (tmp_path / "p" / "datapackage.json").write_text("{not json")
    with pytest.raises(camtrap.PackageRefused, match="not JSON"):
        camtrap.read(tmp_path / "p")
    with pytest.raises(camtrap.PackageRefused, match="no datapackage.json"):
        camtrap.read(tmp_path / "nothing-here")


def edit_csv(path: Path, change) -> None:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    for row in rows:
        change(row)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)


def test_camtrap_bad_rows_are_named_and_left_out_with_what_depends_on_them(tmp_path):
    root = write_package(tmp_path / "p")

    def no_zone(row):
        if row["mediaID"] == "m3":
            row["timestamp"] = "2025-10-03T07:00:00"

    def broken(row):
        if row["observationID"] == "o2":
            row["mediaID"] = "m-unknown"  # an observation of no media
        if row["observationID"] == "o1":
            row["bboxX"] = "0.8"  # x + width past the image's edge

    edit_csv(root / "media.csv", no_zone)
    edit_csv(root / "observations.csv", broken)
    pkg = camtrap.read(root)
    text = "\n".join(pkg.problems)
    assert "media.csv row 4" in text  # m3, its timestamp
    assert "observations.csv row 3" in text  # o2, its unknown media
    assert "'o1'" in text and "outside the image" in text
    assert "'o3'" in text and "'m3' was left out" in text
    assert sorted(pkg.media) == ["m1", "m2"] and pkg.observations == []


# --- doctor -------------------------------------------------------------------------------------------

def test_doctor_passes_here_and_names_what_breaks_the_default_run(tmp_path):
    from deer_reid.doctor import Check, checks, report
    from shared.config import Settings
    from shared.embedded import free_port

    settings = Settings(home=tmp_path / "home", model_cache=tmp_path / "models", api_port=free_port(),
                        kafka_bootstrap=f"127.0.0.1:{free_port()}")
    found = {c.item: c for c in checks(settings)}
    text, status = report(list(found.values()))
    assert status == 0, text
    for item in ("python", "postgresql", "broker", "body model efficientnet_lite0", "xfeat", "disk", "API port"):
        assert found[item].status == "ok", found[item]
    assert found["stack"].status == "optional" and "scripts/run.sh" in found["stack"].fix
    from shared.models import cpu_has_amx, cpu_has_bf16, pick_device

    if pick_device(settings.device).type == "cpu":
        engine = "openvino" if cpu_has_amx() else "torch"  # auto: OpenVINO only where it was measured faster
        precision = "bf16" if cpu_has_bf16() else "fp32"
        assert found["inference engine"].detail.startswith(f"efficientnet_lite0 on {engine} ({precision}, cpu;")
    assert found["inference engine"].status == "ok"
    forced = {c.item: c for c in checks(settings.model_copy(update={"inference_engine": "torch"}))}
    assert forced["inference engine"].detail.startswith("efficientnet_lite0 on torch")
    # a taken port and a corrupted weights file each stop the default run, each with its fix
    weights = next((tmp_path / "models" / "efficientnet_lite0").iterdir())
    weights.write_bytes(b"not the weights")
    with socket.socket() as taken:
        taken.bind((settings.api_host, settings.api_port))
        taken.listen()
        found = {c.item: c for c in checks(settings)}
    assert found["API port"].status == "missing" and "DEER_API_PORT" in found["API port"].fix
    assert found["body model efficientnet_lite0"].status == "missing"
    assert "checksum" in found["body model efficientnet_lite0"].detail
    text, status = report(list(found.values()))
    assert status == 1 and "2 item(s) missing" in text
    assert report([Check("x", "optional", "lost: y", "do z")]) == ("[optional] x: lost: y\n           fix: do z\n"
                                                                   "the default run can work", 0)


def test_megadetector_items_refuse_a_huge_file_unread_and_take_classes_per_image(tmp_path):
    from deer_reid.ingest_sources import megadetector_items, read_cls_map

    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # a sparse gigabyte: refused by its size, never read
        f.truncate(1 << 30)
    with pytest.raises(megadetector.MegaDetectorError, match="1024 MB"):
        megadetector_items(tmp_path, huge, min_conf=0.2, cls="unknown")
    (tmp_path / "cam").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "cam" / name).write_bytes(distinct_jpeg(120, 90, f"cls/{name}"))
    (tmp_path / "md.json").write_text(md_doc([{"file": "cam/a.jpg", "detections": [box()]},
                                              {"file": "cam/b.jpg", "detections": [box()]}]))
    (tmp_path / "cls.csv").write_text("file,cls\ncam\\a.jpg,buck\n")
    items, report = megadetector_items(tmp_path, tmp_path / "md.json", min_conf=0.2, cls="doe",
                                       cls_map=read_cls_map(tmp_path / "cls.csv"))
    classes = {i.label: json.loads(i.fields["detections"])[0]["cls"] for i in items}
    assert classes == {"cam/a.jpg": "buck", "cam/b.jpg": "doe"} and report["refused_entries"] == []
    (tmp_path / "bad.csv").write_text("file,cls\ncam/a.jpg,unicorn\n")
    with pytest.raises(ValueError, match="row 2"):
        read_cls_map(tmp_path / "bad.csv")
