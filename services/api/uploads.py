"""Upload validation (pure: bytes and form fields in, a plan or a clear rejection out)."""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import BinaryIO
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from shared.archives import ArchiveRejected, Limits, read_entries
from shared.images import ImageRejected, crop_jpeg, decode_upload, filename_time
from shared.schemas import DetectionClass
from shared.sites import NAME

EARLIEST = datetime(1990, 1, 1, tzinfo=timezone.utc)
MAX_DETECTIONS_PER_IMAGE = 50
MIN_BOX_SIDE = 8
DETECTION_NAMESPACE = uuid.UUID("5b0f7a53-8a52-4d3c-9a38-3c9a1d3e0d11")


class UploadRejected(ValueError):
    def __init__(self, message: str, status: int = 422, file: str | None = None):
        super().__init__(message)
        self.status = status
        self.file = file


class DetectionIn(BaseModel):
    """A detector's box on the uploaded image: [x0, y0, x1, y1] in pixels."""

    model_config = ConfigDict(extra="forbid")
    box: tuple[int, int, int, int]
    cls: DetectionClass = DetectionClass.unknown
    confidence: float | None = Field(None, ge=0, le=1)
    # the uploader's own name for this animal (a Camtrap DP individualID): kept for export-labels and eval,
    # never read by fusion
    label: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("box")
    @classmethod
    def _ordered(cls, box):
        x0, y0, x1, y1 = box
        if min(box) < 0 or x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
            raise ValueError(f"box {list(box)} must be non-negative with x1-x0 and y1-y0 >= {MIN_BOX_SIDE}")
        return box


_DETECTIONS = TypeAdapter(list[DetectionIn] | dict[str, list[DetectionIn]])


@dataclass
class PlannedDetection:
    id: uuid.UUID
    ordinal: int
    box: tuple[int, int, int, int]
    cls: str
    confidence: float | None
    crop: bytes
    label: str | None = None


@dataclass
class PlannedImage:
    name: str
    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    site: str
    camera: str
    captured_at: datetime
    time_source: str
    detections: list[PlannedDetection]


def safe_file_name(name: str | None) -> str:
    """The uploaded file's name if it is a plain name; path tricks and control characters are refused."""
    if not name:
        raise UploadRejected("file has no name")
    if len(name) > 255 or any(ord(c) < 32 or c in "/\\" for c in name) or name in (".", "..") \
            or name.startswith("."):
        raise UploadRejected(f"file name {name!r} is not a plain file name", file=name[:255])
    return name


def expand_archive(name: str, file: BinaryIO, limits: Limits) -> list[tuple[str, bytes]]:
    """An uploaded archive's images as (file name, bytes). An upload is all or nothing, so any refused
    entry refuses the upload, naming the entry and why."""
    out = []
    try:
        for entry in read_entries(file, limits):
            if entry.error is not None:
                raise UploadRejected(f"archive entry {entry.name!r}: {entry.error}", status=entry.status,
                                     file=f"{name}!{entry.name}"[:300])
            out.append((safe_file_name(entry.file_name), entry.data))
    except ArchiveRejected as exc:
        raise UploadRejected(f"archive {name!r}: {exc}", status=exc.status, file=name) from None
    return out


def parse_time(value: str, what: str) -> datetime:
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UploadRejected(f"{what} {value!r} is not an ISO-8601 time") from None
    if when.tzinfo is None:
        raise UploadRejected(f"{what} {value!r} has no time zone (add Z or +HH:MM)")
    return when


def check_time(when: datetime, source: str, now: datetime, file: str) -> datetime:
    if not EARLIEST <= when <= now + timedelta(days=1):
        raise UploadRejected(f"capture time {when.isoformat()} (from {source}) is not plausible", file=file)
    return when


def parse_detections(raw: str | None, names: list[str]) -> dict[str, list[DetectionIn] | None]:
    """Per file name, the boxes given for it (None: the whole image is one detection)."""
    if raw is None or not raw.strip():
        return {n: None for n in names}
    if len(raw) > 1_000_000:
        raise UploadRejected("detections field is over 1 MB", status=413)
    try:
        parsed = _DETECTIONS.validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise UploadRejected(f"detections: {where}: {first.get('msg')}") from None
    if isinstance(parsed, list):
        if len(names) != 1:
            raise UploadRejected("with several files, detections must map each file name to its boxes")
        parsed = {names[0]: parsed}
    unknown = set(parsed) - set(names)
    if unknown:
        raise UploadRejected(f"detections name files that were not uploaded: {sorted(unknown)[:5]}")
    out: dict[str, list[DetectionIn] | None] = {}
    for name in names:
        boxes = parsed.get(name)
        if boxes is not None and not 1 <= len(boxes) <= MAX_DETECTIONS_PER_IMAGE:
            raise UploadRejected(f"{len(boxes)} detections for {name}; 1 to {MAX_DETECTIONS_PER_IMAGE} allowed", file=name)
        out[name] = boxes
    return out


def plan_image(name: str, data: bytes, boxes: list[DetectionIn] | None, *, site: str | None,
               fallback_site: str | None = None, camera: str | None,
               captured_at: datetime | None, fallback_time: datetime | None, whole_image_cls: DetectionClass,
               max_bytes: int, max_pixels: int, crop_max_side: int, now: datetime) -> PlannedImage:
    """Validate one file completely and prepare its rows; raises UploadRejected."""
    try:
        decoded = decode_upload(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except ImageRejected as exc:
        raise UploadRejected(str(exc), status=exc.status, file=name) from None
    from_name = filename_time(name)
    site = site or (from_name[0] if from_name else None) or fallback_site
    if not site:
        raise UploadRejected("site missing: give the site field or name the file SITE_YYYYMMDD_HHMMSS", file=name)
    camera = camera or "unknown"
    for label, value in (("site", site), ("camera", camera)):
        if not NAME.match(value):
            raise UploadRejected(f"{label} {value!r} must be 1-64 letters, digits, '.', '_' or '-'", file=name)
    for when, source in ((captured_at, "request"), (decoded.exif_time, "exif"),
                         (from_name[1] if from_name else None, "file name"), (fallback_time, "fallback")):
        if when is not None:
            check_time(when, source, now, name)
            break
    else:
        raise UploadRejected("capture time unknown: no captured_at, no EXIF time, no SITE_YYYYMMDD_HHMMSS "
                             "file name and no fallback time", file=name)
    if boxes is None:
        boxes = [DetectionIn(box=(0, 0, decoded.width, decoded.height), cls=whole_image_cls)]
    sha = hashlib.sha256(data).hexdigest()
    planned = []
    for ordinal, det in enumerate(boxes):
        x0, y0, x1, y1 = det.box
        if x1 > decoded.width or y1 > decoded.height:
            raise UploadRejected(f"box {list(det.box)} lies outside the {decoded.width}x{decoded.height} image",
                                 file=name)
        planned.append(PlannedDetection(
            id=uuid.uuid5(DETECTION_NAMESPACE, f"{sha}:{ordinal}"), ordinal=ordinal, box=det.box,
            cls=det.cls.value, confidence=det.confidence,
            crop=crop_jpeg(decoded.image, det.box, crop_max_side), label=det.label))
    return PlannedImage(name=name, data=data, sha256=sha, format=decoded.format, width=decoded.width,
                        height=decoded.height, site=site, camera=camera, captured_at=when, time_source=source,
                        detections=planned)
