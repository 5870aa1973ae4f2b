"""What `deer-reid ingest` sends for a folder with MegaDetector output, and for a Camtrap DP package:
the readers in `deer_reid.sources` give boxes; this turns them into upload items (one image each, its
boxes in pixels, its own site, camera, time and sighting) and a report of what was left out and why.
Images are read only when their turn to be uploaded comes."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Iterator

from deer_reid.ingest import Item, find_files
from deer_reid.sources import camtrap, megadetector
from shared.archives import IMAGE_SUFFIXES

MIN_BOX_SIDE = 8  # the API's own limit (services/api/uploads.py): smaller boxes are dropped and counted
MAX_BOXES = 50  # the API's per-image limit: the most confident are kept
SIGHTING_KEY = re.compile(r"[^A-Za-z0-9._:-]")
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height (the API turns images upright)


def upright_size(data: bytes) -> tuple[int, int]:
    """Width and height of an image as the API sees it (EXIF orientation applied), from its header."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if im.getexif().get(0x0112) in ROTATED:
            width, height = height, width
    return width, height


def pixel_boxes(boxes: list[tuple[tuple[float, float, float, float], float | None, str | None]], width: int,
                height: int, cls: str) -> tuple[list[dict], int]:
    """Normalised (x, y, w, h) boxes with their confidence and label as the API's pixel boxes, the most
    confident first and at most MAX_BOXES; returns them and how many were too small to keep."""
    out, small = [], 0
    for (x, y, w, h), conf, label in sorted(boxes, key=lambda b: -(b[1] or 0.0)):
        box = megadetector.Box(x, y, w, h, conf or 0.0).pixels(width, height)
        if box[2] - box[0] < MIN_BOX_SIDE or box[3] - box[1] < MIN_BOX_SIDE:
            small += 1
            continue
        det = {"box": list(box), "cls": cls}
        if conf is not None:
            det["confidence"] = round(conf, 4)
        if label:
            det["label"] = label[:200]
        out.append(det)
    return out[:MAX_BOXES], small


def _with_boxes(label: str, name: str, path: Path, boxes, cls: str, fields: dict[str, str],
                report: dict) -> Item | None:
    """The upload item of one image and its normalised boxes (None: every box too small, counted)."""
    data = path.read_bytes()
    try:
        width, height = upright_size(data)
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        return Item(label, name, error=f"cannot read the image to place its boxes: {exc}", status=422)
    dets, small = pixel_boxes(boxes, width, height, cls)
    report["boxes_too_small"] += small
    if not dets:
        report["skipped_small_boxes"] += 1
        return None
    return Item(label, name, data, fields={**fields, "detections": json.dumps(dets)})


# --- MegaDetector -------------------------------------------------------------------------------------

def megadetector_items(folder: Path, detections_json: Path, *, min_conf: float, cls: str,
                       cls_map: dict[str, str] | None = None) -> tuple[Iterator[Item], dict]:
    """Items for the images of `folder` that MegaDetector found animals in, and the report (filled in as
    the items are drawn). Raises MegaDetectorError for a file that is not MegaDetector output."""
    folder = Path(folder)
    size = detections_json.stat().st_size
    if size > megadetector.MAX_JSON_BYTES:  # refused before reading a byte of it
        raise megadetector.MegaDetectorError(
            f"{detections_json} is {size / 2**20:.0f} MB, over {megadetector.MAX_JSON_BYTES // 2**20} MB: "
            "not a detector's output for one folder")
    results = megadetector.parse(detections_json.read_bytes(), min_conf=min_conf)
    images = [p for p in find_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else []
    relative = [p.relative_to(folder).as_posix() for p in images]
    matched, unnamed = megadetector.match(results.entries, relative)
    seen: dict[str, int] = {}
    for entry in results.entries:  # two entries for one image: the first counts
        rel = matched.get(entry.index)
        if rel is not None and rel in seen:
            entry.error = f"images[{entry.index}] ({entry.file!r}) names the same image as images[{seen[rel]}]"
            del matched[entry.index]
        elif rel is not None:
            seen[rel] = entry.index
    report = {"format_version": results.format_version, "detector": results.detector, "min_conf": min_conf,
              "entries": len(results.entries), "images_in_folder": len(images),
              "animal_boxes": sum(len(e.animals) for e in results.entries if e.index in matched),
              "animal_boxes_below_threshold": sum(e.below_threshold for e in results.entries if e.index in matched),
              "never_uploaded": _count_others(e for e in results.entries if e.index in matched),
              "skipped_empty": 0, "skipped_small_boxes": 0, "boxes_too_small": 0,
              "refused_entries": [e.error for e in results.entries if e.error],
              "images_without_entry": len(unnamed), "images_without_entry_first": unnamed[:20]}
    cls_map = cls_map or {}

    def items() -> Iterator[Item]:
        for entry in results.entries:
            rel = matched.get(entry.index)
            if rel is None:
                continue
            if not entry.animals:  # an empty frame, or people and vehicles only: nothing to identify
                report["skipped_empty"] += 1
                continue
            boxes = [((b.x, b.y, b.w, b.h), b.conf, None) for b in entry.animals]
            item = _with_boxes(rel, Path(rel).name, folder / rel, boxes, cls_map.get(rel, cls), {}, report)
            if item is not None:
                yield item

    return items(), report


def _count_others(entries) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries:
        for name, n in e.others.items():
            out[name] = out.get(name, 0) + n
    return out


def read_cls_map(path: Path) -> dict[str, str]:
    """A CSV of `file,cls` (file relative to the ingested folder): each image's class of animal."""
    import csv

    from shared.schemas import DetectionClass

    known = {c.value for c in DetectionClass}
    out = {}
    with open(path, newline="") as f:
        for number, row in enumerate(csv.DictReader(f), start=2):
            if set(row) < {"file", "cls"} or row.get("cls") not in known:
                raise ValueError(f"{path} row {number}: needs columns file,cls with cls one of {sorted(known)}")
            out[megadetector.PurePosixPath(*megadetector.path_parts(row["file"])).as_posix()] = row["cls"]
    return out


# --- Camtrap DP ---------------------------------------------------------------------------------------

def camtrap_items(package: camtrap.Package, *, cls: str) -> tuple[Iterator[Item], dict]:
    """Items for a read package's media that hold observations with boxes, in time order, and its report."""
    by_media: dict[str, list[camtrap.Observation]] = {}
    for obs in package.observations:
        by_media.setdefault(obs.media, []).append(obs)
    report = {"deployments": len(package.deployments), "media": len(package.media),
              "observations_used": len(package.observations), "observations_skipped": package.skipped,
              "media_without_observations": len(package.media) - len(by_media),
              "refused_rows": package.problems, "skipped_small_boxes": 0, "boxes_too_small": 0}

    def items() -> Iterator[Item]:
        for media_id in sorted(by_media, key=lambda m: (package.media[m].timestamp, m)):
            media, observations = package.media[media_id], by_media[media_id]
            deployment = package.deployments[media.deployment]
            fields = {"site": deployment.site, "camera": deployment.camera,
                      "captured_at": media.timestamp.isoformat()}
            events = {o.event for o in observations if o.event}
            if len(events) == 1:
                fields["sighting"] = SIGHTING_KEY.sub("_", next(iter(events)))[:100].lstrip("._:-") or "event"
            boxes = [(o.box, None, o.individual) for o in observations]
            item = _with_boxes(f"{media_id} ({media.path.name})", Path(media.file_name).name or media.path.name,
                               media.path, boxes, cls, fields, report)
            if item is not None:
                yield item

    return items(), report
