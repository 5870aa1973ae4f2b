"""Camtrap DP 1.0.2 data packages read into what deer-reid uploads: deployments as sites and cameras,
media as images with their timestamps, media-level animal observations with bounding boxes as
detections, `eventID` as the sighting, `individualID` as the uploader's own label (kept for
`export-labels` and eval, never shown to fusion).

Validation comes first, offline, against the standard's own profile and table schemas (copies in
deer_reid/schemas): a package whose descriptor or tables are broken (a missing resource, a missing
column, a descriptor the profile refuses) is refused whole with the validator's messages; a bad row
(a timestamp without a zone, an observation of an unknown media, a box outside the image) is reported
with its table and row number and left out, with whatever depends on it; the rest is ingested.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas" / "camtrap-dp-1.0.2"
TABLES = ("deployments", "media", "observations")
# row-level findings: the row is left out and named; anything else refuses the package
ROW_ERRORS = {"type-error", "constraint-error", "foreign-key", "unique-error", "primary-key", "missing-cell",
              "extra-cell", "blank-row", "row-constraint"}


class PackageRefused(ValueError):
    """The package cannot be read at all; `messages` are the validator's."""

    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages[:5]) + (f" (and {len(messages) - 5} more)" if len(messages) > 5 else ""))
        self.messages = messages


@dataclass
class Deployment:
    id: str
    site: str
    camera: str
    lat: float
    lon: float


@dataclass
class Media:
    id: str
    deployment: str
    path: Path
    timestamp: datetime
    file_name: str


@dataclass
class Observation:
    media: str
    box: tuple[float, float, float, float]  # normalised x, y, width, height
    event: str | None
    individual: str | None
    scientific_name: str


@dataclass
class Package:
    deployments: dict[str, Deployment]
    media: dict[str, Media]
    observations: list[Observation]
    problems: list[str] = field(default_factory=list)  # rows left out, each named
    skipped: dict[str, int] = field(default_factory=dict)  # observations not used, by why


def _profile_errors(descriptor: dict) -> list[str]:
    """The descriptor against the Camtrap DP profile. Its GeoJSON reference resolves to the copy that
    frictionless ships; its base Data Package schema (another URL) is what frictionless checks."""
    import frictionless
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    geojson = json.loads((Path(frictionless.__file__).parent / "assets" / "profiles" / "geojson.json").read_text())
    registry = Registry().with_resource("http://json.schemastore.org/geojson.json",
                                        Resource.from_contents(geojson, default_specification=DRAFT4))
    profile = json.loads((SCHEMAS / "camtrap-dp-profile.json").read_text())
    profile["allOf"] = [p for p in profile["allOf"] if "$ref" not in p]
    validator = jsonschema.Draft4Validator(profile, registry=registry)
    return [f"datapackage.json: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(descriptor)]


def validate(folder: Path) -> tuple[dict, dict[str, dict[int, list[str]]]]:
    """(descriptor, {table: {row number: messages}}) of a valid package; raises PackageRefused."""
    import frictionless

    folder = Path(folder)
    try:
        descriptor = json.loads((folder / "datapackage.json").read_text())
    except FileNotFoundError:
        raise PackageRefused([f"{folder} holds no datapackage.json: not a data package"]) from None
    except (OSError, ValueError) as exc:
        raise PackageRefused([f"datapackage.json is not JSON: {exc}"]) from None
    if not isinstance(descriptor, dict):
        raise PackageRefused(["datapackage.json is not an object"])
    messages = _profile_errors(descriptor)
    resources = {r.get("name"): r for r in descriptor.get("resources", []) if isinstance(r, dict)}
    messages += [f"resource {name!r} is missing" for name in TABLES if name not in resources]
    for name in TABLES:
        path = resources.get(name, {}).get("path")
        if name in resources and (not isinstance(path, str) or not (folder / path).is_file()
                                  or not (folder / path).resolve().is_relative_to(folder.resolve())):
            messages.append(f"resource {name!r}: its file {path!r} is not in the package")
    if messages:
        raise PackageRefused(messages)
    local = {k: v for k, v in descriptor.items() if k != "profile"}
    local["resources"] = [{**resources[name], "schema": json.loads((SCHEMAS / f"{name}-table-schema.json").read_text())}
                          for name in TABLES]
    report = frictionless.Package(local, basepath=str(folder)).validate()
    rows: dict[str, dict[int, list[str]]] = {name: {} for name in TABLES}
    refused = [f"datapackage.json: {e.message}" for e in report.errors]
    for task in report.tasks:
        table = task.name
        for e in task.errors:
            number = getattr(e, "row_number", None)
            if e.type in ROW_ERRORS and number is not None and table in rows:
                rows[table].setdefault(number, []).append(e.message)
            else:
                refused.append(f"{table}: {e.message}")
    if refused:
        raise PackageRefused(refused)
    return descriptor, rows


def _table(folder: Path, descriptor: dict, name: str) -> list[tuple[int, dict]]:
    resource = next(r for r in descriptor["resources"] if r.get("name") == name)
    with open(folder / resource["path"], newline="", encoding="utf-8") as f:
        # row numbers as frictionless counts them: the header is row 1
        return [(i + 2, row) for i, row in enumerate(csv.DictReader(f))]


def _plain(value: str, fallback: str) -> str:
    """A site or camera name from a package's id: letters, digits, '.', '_', '-' kept, the rest '_'."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in (value or "").strip())[:64]
    name = name.lstrip("._-") or fallback
    return name


def read(folder: Path, *, taxon: str | None = None) -> Package:
    """Validate and read a package. `taxon`: keep observations of this scientific name only (case
    insensitive; None: every animal observation)."""
    folder = Path(folder)
    descriptor, bad = validate(folder)
    problems = [f"{table}.csv row {number}: {'; '.join(msgs)}"
                for table in TABLES for number, msgs in sorted(bad[table].items())]
    deployments = {}
    for number, row in _table(folder, descriptor, "deployments"):
        if number in bad["deployments"]:
            continue
        site = _plain(row.get("locationID") or row.get("locationName") or row["deploymentID"], "site")
        deployments[row["deploymentID"]] = Deployment(
            row["deploymentID"], site, _plain(row.get("cameraID") or row["deploymentID"], "camera"),
            float(row["latitude"]), float(row["longitude"]))
    media = {}
    for number, row in _table(folder, descriptor, "media"):
        if number in bad["media"]:
            continue
        where = f"media.csv row {number} ({row['mediaID']!r})"
        if row["deploymentID"] not in deployments:
            problems.append(f"{where}: its deployment {row['deploymentID']!r} was left out")
            continue
        if not row["fileMediatype"].startswith("image/"):
            problems.append(f"{where}: {row['fileMediatype']} is not a still image")
            continue
        if "://" in row["filePath"]:
            problems.append(f"{where}: {row['filePath']!r} is remote; download the media into the package first")
            continue
        path = (folder / row["filePath"]).resolve()
        if not path.is_relative_to(folder.resolve()):
            problems.append(f"{where}: {row['filePath']!r} lies outside the package")
            continue
        if not path.is_file():
            problems.append(f"{where}: no file at {row['filePath']!r}")
            continue
        stamp = datetime.strptime(row["timestamp"], "%Y-%m-%dT%H:%M:%S%z")
        media[row["mediaID"]] = Media(row["mediaID"], row["deploymentID"], path, stamp,
                                      row.get("fileName") or path.name)
    observations, skipped = [], {}

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for number, row in _table(folder, descriptor, "observations"):
        where = f"observations.csv row {number} ({row['observationID']!r})"
        if number in bad["observations"]:
            continue
        if row["observationType"] != "animal":
            skip(f"observationType {row['observationType']}")
            continue
        if taxon is not None and row.get("scientificName", "").strip().lower() != taxon.strip().lower():
            skip("another taxon")
            continue
        if row["observationLevel"] != "media" or not row.get("mediaID"):
            skip("event-level (no box)")
            continue
        if row["mediaID"] not in media:
            problems.append(f"{where}: its media {row['mediaID']!r} was left out")
            continue
        values = [row.get(k, "") for k in ("bboxX", "bboxY", "bboxWidth", "bboxHeight")]
        if not all(values):
            skip("no bounding box")
            continue
        x, y, w, h = (float(v) for v in values)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0 or x < 0 or y < 0 \
                or x + w > 1.001 or y + h > 1.001:
            problems.append(f"{where}: bounding box {values} lies outside the image")
            continue
        observations.append(Observation(row["mediaID"], (x, y, w, h), row.get("eventID") or None,
                                        row.get("individualID") or None, row.get("scientificName", "")))
    return Package(deployments, media, observations, problems, skipped)
