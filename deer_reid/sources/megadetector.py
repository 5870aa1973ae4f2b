"""MegaDetector batch output (the JSON that MegaDetector's batch script, AddaxAI/EcoAssist and Timelapse
write) read into per-image animal boxes. Pure: text in, boxes and per-entry errors out.

The format (lila.science/megadetector-output-format): `info.format_version` ("1.0" to "1.6"),
`detection_categories` ({"1": "animal", "2": "person", "3": "vehicle"}; absent in the oldest files,
where those three ids are the convention), and `images[]` with `file` (relative to the folder the
detector ran on, or absolute on the machine it ran on; forward or back slashes), `detections[]` of
`category`, `conf` and `bbox` = normalised [x_min, y_min, width, height], an optional `failure`
string (then `detections` is null), and for videos `frame_rate`/`frame_number` (not images: refused).
Files up to 1.3 also carry `max_detection_conf` per image; it is ignored (the boxes say it).

Only animal boxes are kept: person and vehicle boxes are never uploaded (they are people's privacy,
and nothing here identifies them); an image whose animal boxes all fall below the threshold is skipped,
never uploaded as a whole-image detection.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath

DEFAULT_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
MAX_JSON_BYTES = 256 * 1024 * 1024  # a season of a large network is tens of MB; more is not a detector's output
EDGE_SLACK = 1e-3  # detectors round to 4 decimals: x + width may pass 1.0 by that much


class MegaDetectorError(ValueError):
    """The file is not MegaDetector output at all (nothing of it is used)."""


@dataclass(frozen=True)
class Box:
    x: float  # normalised [x_min, y_min, width, height], as MegaDetector writes it
    y: float
    w: float
    h: float
    conf: float

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """[x0, y0, x1, y1] in the pixels of a width x height image (clipped to it)."""
        x0 = min(max(round(self.x * width), 0), width)
        y0 = min(max(round(self.y * height), 0), height)
        x1 = min(max(round((self.x + self.w) * width), 0), width)
        y1 = min(max(round((self.y + self.h) * height), 0), height)
        return x0, y0, x1, y1


@dataclass
class Entry:
    """One `images[]` entry: where it points and its animal boxes above the threshold."""

    index: int
    file: str
    parts: tuple[str, ...]  # the path's components, slashes of either kind
    animals: list[Box] = field(default_factory=list)
    below_threshold: int = 0  # animal boxes under the threshold
    others: dict[str, int] = field(default_factory=dict)  # category name -> boxes never uploaded
    error: str | None = None  # why this entry is refused (the rest of the file still counts)


@dataclass
class Results:
    format_version: str
    detector: str | None
    entries: list[Entry]


def _category_names(doc: dict) -> dict[str, str]:
    cats = doc.get("detection_categories")
    if cats is None:
        return dict(DEFAULT_CATEGORIES)
    if not isinstance(cats, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                             for k, v in cats.items()):
        raise MegaDetectorError("detection_categories must map category ids (strings) to names")
    return {k: v.strip().lower() for k, v in cats.items()}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _box(raw: dict, where: str) -> tuple[str, Box]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not an object")
    bbox, conf, category = raw.get("bbox"), raw.get("conf"), raw.get("category")
    if not isinstance(category, (str, int)) or isinstance(category, bool):
        raise ValueError(f"{where}: category {category!r} is not a category id")
    if not _finite(conf) or not 0.0 <= conf <= 1.0:
        raise ValueError(f"{where}: conf {conf!r} is not a number in [0, 1]")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_finite(v) for v in bbox):
        raise ValueError(f"{where}: bbox {bbox!r} is not four numbers [x, y, width, height]")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: bbox {bbox!r} has a width or height that is not positive")
    if x < -EDGE_SLACK or y < -EDGE_SLACK or x + w > 1 + EDGE_SLACK or y + h > 1 + EDGE_SLACK:
        raise ValueError(f"{where}: bbox {bbox!r} lies outside the image (MegaDetector's boxes are normalised "
                         "to [0, 1])")
    return str(category), Box(x, y, w, h, float(conf))


def path_parts(file: str) -> tuple[str, ...]:
    """A detector's path as components: back slashes are separators too, a drive (C:) and empty parts go."""
    parts = [p for p in file.replace("\\", "/").split("/") if p not in ("", ".")]
    if parts and len(parts[0]) == 2 and parts[0][1] == ":":
        parts = parts[1:]
    return tuple(parts)


def parse(text: str | bytes, *, min_conf: float = 0.2) -> Results:
    """Read MegaDetector output; raises MegaDetectorError when the document is not one. Entries that
    cannot be used carry their `error`, the others their animal boxes at or above `min_conf`."""
    if len(text) > MAX_JSON_BYTES:
        raise MegaDetectorError(f"the file is {len(text) / 2**20:.0f} MB, over {MAX_JSON_BYTES // 2**20} MB: "
                                "not a detector's output for one folder")
    try:
        doc = json.loads(text, parse_constant=lambda c: float("nan"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MegaDetectorError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise MegaDetectorError("not MegaDetector batch output: expected an object with an `images` list "
                                "(see lila.science/megadetector-output-format)")
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    version = str(info.get("format_version", "1.0"))
    try:
        major = int(float(version))
    except ValueError:
        raise MegaDetectorError(f"info.format_version {version!r} is not a version number") from None
    if major != 1:
        raise MegaDetectorError(f"format_version {version} is not one this reader knows (1.x)")
    names = _category_names(doc)
    entries = []
    for index, raw in enumerate(doc["images"]):
        where = f"images[{index}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("file"), str) or not raw["file"].strip():
            entries.append(Entry(index, str(raw)[:200] if not isinstance(raw, dict) else str(raw.get("file"))[:200],
                                 (), error=f"{where} has no `file`"))
            continue
        entry = Entry(index, raw["file"], path_parts(raw["file"]))
        entries.append(entry)
        if ".." in entry.parts:
            entry.error = f"{where} ({entry.file!r}) names a file outside the folder"
            continue
        if raw.get("failure"):
            entry.error = f"{where} ({entry.file!r}): the detector failed on it: {str(raw['failure'])[:200]}"
            continue
        if "frame_rate" in raw:
            entry.error = f"{where} ({entry.file!r}) is a video; deer-reid reads still images"
            continue
        detections = raw.get("detections")
        if not isinstance(detections, list):
            entry.error = f"{where} ({entry.file!r}): `detections` is not a list"
            continue
        try:
            for j, det in enumerate(detections):
                category, box = _box(det, f"{where}.detections[{j}]")
                name = names.get(category)
                if name != "animal":  # persons, vehicles, unknown ids: never uploaded
                    label = name or f"category {category}"
                    entry.others[label] = entry.others.get(label, 0) + 1
                elif box.conf >= min_conf:
                    entry.animals.append(box)
                else:
                    entry.below_threshold += 1
        except ValueError as exc:
            entry.error = f"{exc} ({entry.file!r})"
            entry.animals.clear()
    return Results(version, info.get("detector") if isinstance(info.get("detector"), str) else None, entries)


def match(entries: list[Entry], relative_paths: list[str]) -> tuple[dict[int, str], list[str]]:
    """Which folder image each entry means: the longest tail of its path that names exactly one image
    (paths from another machine keep only their part below the folder). Returns (entry index -> relative
    path) and the images no entry names."""
    tails: dict[tuple[str, ...], set[str]] = {}
    for rel in relative_paths:
        parts = PurePosixPath(rel).parts
        for k in range(1, len(parts) + 1):
            tails.setdefault(tuple(p.lower() for p in parts[-k:]), set()).add(rel)
    matched: dict[int, str] = {}
    named: set[str] = set()  # images some entry names, refused entries included (they have an entry)
    for entry in entries:
        if not entry.parts:
            continue
        if entry.error is not None:
            found = None if ".." in entry.parts else _unique_tail(tails, entry.parts)[0]
            if found is not None:
                named.add(found)
            continue
        found, ambiguous = _unique_tail(tails, entry.parts)
        if found is not None:
            matched[entry.index] = found
        else:
            entry.error = (f"images[{entry.index}] ({entry.file!r}) " +
                           ("could name several images in the folder" if ambiguous else "names no image in the folder"))
    named |= set(matched.values())
    return matched, sorted(set(relative_paths) - named)


def _unique_tail(tails: dict, parts: tuple[str, ...]) -> tuple[str | None, bool]:
    """The one image the longest tail of `parts` names, and whether a tail named several (a shorter tail
    can only name more, so the search stops there)."""
    lowered = tuple(p.lower() for p in parts)
    for k in range(len(lowered), 0, -1):
        found = tails.get(lowered[-k:], set())
        if len(found) == 1:
            return next(iter(found)), False
        if len(found) > 1:
            return None, True
    return None, False
