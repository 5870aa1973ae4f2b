"""Exports for people's own analyses: plain CSV tables, and Camtrap DP 1.0.2 data packages.

`load` reads one snapshot (one repeatable-read transaction) of the property; the table builders are
pure functions of it; the API sends them as a zip, which `deer-reid export` unpacks into a folder.

Camtrap DP: a deployment is one camera at one site, a media row one uploaded image (its id is the
image's SHA-256), an observation one detection at media level with `individualID` = our individual
id (its name, when people gave one, goes in `observationTags`) and `eventID` = the sighting (the frames
of one burst). `deer-reid export --with-media` adds the images themselves at each `filePath`, so the
package can be ingested elsewhere (`deer-reid ingest DIR --camtrap-dp`). Camtrap DP requires coordinates for
every deployment: a site without them is refused with its name, not exported with invented ones.
"""
from __future__ import annotations

import csv
import io
import json
import zipfile
from datetime import datetime, timezone

import asyncpg

CAMTRAP_VERSION = "1.0.2"
CAMTRAP_BASE = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{CAMTRAP_VERSION}"
LIFE_STAGE = {"fawn": "juvenile", "young": "subadult", "mid": "adult", "mature": "adult", "buck": "adult",
              "doe": "adult"}
SEX = {"buck": "male", "mature": "male", "mid": "male", "young": "male", "doe": "female"}
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Camtrap DP tables carry every field of their schema, in the schema's order (the ones we have no
# value for stay empty)
CAMTRAP_FIELDS = {
    "deployments.csv": [
        "deploymentID", "locationID", "locationName", "latitude", "longitude", "coordinateUncertainty",
        "deploymentStart", "deploymentEnd", "setupBy", "cameraID", "cameraModel", "cameraDelay", "cameraHeight",
        "cameraDepth", "cameraTilt", "cameraHeading", "detectionDistance", "timestampIssues", "baitUse",
        "featureType", "habitat", "deploymentGroups", "deploymentTags", "deploymentComments"],
    "media.csv": [
        "mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic", "fileName",
        "fileMediatype", "exifData", "favorite", "mediaComments"],
    "observations.csv": [
        "observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd", "observationLevel",
        "observationType", "cameraSetupType", "scientificName", "count", "lifeStage", "sex", "behavior",
        "individualID", "individualPositionRadius", "individualPositionAngle", "individualSpeed", "bboxX", "bboxY",
        "bboxWidth", "bboxHeight", "classificationMethod", "classifiedBy", "classificationTimestamp",
        "classificationProbability", "observationTags", "observationComments"],
}


class ExportError(Exception):
    pass


def _ts(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def load(pool: asyncpg.Pool, prop: str | None) -> dict:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        individuals = await conn.fetch(
            """SELECT id, name, tags, notes, property, sex, sightings, first_seen, last_seen, merged_into, created_by
               FROM individuals WHERE ($1::text IS NULL OR property = $1) ORDER BY id""", prop)
        detections = await conn.fetch(
            """SELECT d.id, d.image_sha256, d.ordinal, d.box, d.cls, d.detector_confidence, d.site, d.camera,
                      d.captured_at, d.state, d.individual_id, d.score, d.decided_by, d.property, d.updated_at,
                      d.sighting, i.width, i.height, i.format, i.original_name
               FROM detections d JOIN images i ON i.sha256 = d.image_sha256
               WHERE ($1::text IS NULL OR d.property = $1) ORDER BY d.captured_at, d.image_sha256, d.ordinal""", prop)
        sites = await conn.fetch("SELECT name, property, lat, lon FROM sites WHERE ($1::text IS NULL OR property = $1)",
                                 prop)
    return {"property": prop, "individuals": [dict(r) for r in individuals],
            "detections": [dict(r) for r in detections], "sites": {r["name"]: dict(r) for r in sites},
            "created": datetime.now(timezone.utc)}


# --- CSV --------------------------------------------------------------------------------------------

def csv_tables(snapshot: dict) -> dict[str, list[dict]]:
    names = {i["id"]: i["name"] for i in snapshot["individuals"]}
    individuals = [{"individual_id": i["id"], "name": i["name"] or "", "tags": ";".join(i["tags"]),
                    "notes": i["notes"], "property": i["property"], "sex": i["sex"], "sightings": i["sightings"],
                    "first_seen": _ts(i["first_seen"]), "last_seen": _ts(i["last_seen"]),
                    "merged_into": i["merged_into"] or "", "created_by": i["created_by"]}
                   for i in snapshot["individuals"]]
    detections = [{"detection_id": str(d["id"]), "image_sha256": d["image_sha256"], "file_name": d["original_name"],
                   "site": d["site"], "camera": d["camera"], "captured_at": _ts(d["captured_at"]), "cls": d["cls"],
                   "box": " ".join(map(str, d["box"])), "state": d["state"],
                   "individual_id": d["individual_id"] or "", "individual_name": names.get(d["individual_id"]) or "",
                   "score": "" if d["score"] is None else round(float(d["score"]), 5),
                   "decided_by": d["decided_by"] or ""} for d in snapshot["detections"]]
    per_day: dict[tuple, set] = {}
    counts: dict[tuple, int] = {}
    for d in snapshot["detections"]:
        if d["state"] not in ("assigned", "new"):
            continue
        key = (d["site"], d["captured_at"].astimezone(timezone.utc).date().isoformat(), d["individual_id"])
        counts[key] = counts.get(key, 0) + 1
        per_day.setdefault(key, set()).add(d["image_sha256"])
    sightings = [{"site": s, "date": day, "individual_id": ind, "individual_name": names.get(ind) or "",
                  "detections": counts[(s, day, ind)], "images": len(per_day[(s, day, ind)])}
                 for s, day, ind in sorted(counts, key=lambda k: (k[0], k[1], k[2]))]
    return {"individuals.csv": individuals, "detections.csv": detections, "sightings_per_site_day.csv": sightings}


# --- Camtrap DP -------------------------------------------------------------------------------------

def camtrap_dp(snapshot: dict, *, scientific_name: str = "Cervidae", taxon_rank: str = "family",
               contributor: str = "deer-reid user", title: str | None = None) -> tuple[dict, dict[str, list[dict]]]:
    """(datapackage.json, {file name: rows}) of a Camtrap DP 1.0.2 package."""
    dets = snapshot["detections"]
    if not dets:
        raise ExportError("nothing to export: no detections")
    missing = sorted({d["site"] for d in dets
                      if snapshot["sites"].get(d["site"], {}).get("lat") is None})
    if missing:
        raise ExportError("Camtrap DP needs coordinates for every site; give them with `deer-reid sites add NAME "
                          f"--lat .. --lon ..` for: {', '.join(missing[:20])}")
    names = {i["id"]: i["name"] for i in snapshot["individuals"]}
    deployments: dict[str, dict] = {}
    media: dict[str, dict] = {}
    observations = []
    for d in dets:
        dep_id = f"{d['site']}:{d['camera']}"
        site = snapshot["sites"][d["site"]]
        dep = deployments.setdefault(dep_id, {
            "deploymentID": dep_id, "locationID": d["site"], "locationName": d["site"],
            "latitude": site["lat"], "longitude": site["lon"], "cameraID": d["camera"],
            "start": d["captured_at"], "end": d["captured_at"]})
        dep["start"], dep["end"] = min(dep["start"], d["captured_at"]), max(dep["end"], d["captured_at"])
        media.setdefault(d["image_sha256"], {
            "mediaID": d["image_sha256"], "deploymentID": dep_id, "captureMethod": "activityDetection",
            "timestamp": _ts(d["captured_at"]), "filePath": f"media/{d['image_sha256'][:2]}/{d['image_sha256']}",
            "filePublic": "false", "fileName": d["original_name"],
            "fileMediatype": MEDIA_TYPES.get(d["format"], "image/jpeg")})
        x0, y0, x1, y1 = d["box"]
        placed = d["state"] in ("assigned", "new")
        name = names.get(d["individual_id"]) if placed else None
        observations.append({
            "observationID": str(d["id"]), "deploymentID": dep_id, "mediaID": d["image_sha256"],
            "eventID": str(d["sighting"]) if d["sighting"] else "",
            "eventStart": _ts(d["captured_at"]), "eventEnd": _ts(d["captured_at"]), "observationLevel": "media",
            "observationType": "animal", "scientificName": scientific_name, "count": 1,
            "lifeStage": LIFE_STAGE.get(d["cls"], ""), "sex": SEX.get(d["cls"], ""),
            "individualID": str(d["individual_id"]) if placed and d["individual_id"] else "",
            "bboxX": round(x0 / d["width"], 6), "bboxY": round(y0 / d["height"], 6),
            "bboxWidth": round(max(1, x1 - x0) / d["width"], 6), "bboxHeight": round(max(1, y1 - y0) / d["height"], 6),
            "classificationMethod": "human" if d["decided_by"] == "human" else "machine",
            "classifiedBy": "person (deer-reid review)" if d["decided_by"] == "human" else "deer-reid fusion",
            "classificationTimestamp": _ts(d["updated_at"]),
            "classificationProbability": "" if d["score"] is None or d["decided_by"] == "human"
            else round(min(1.0, max(0.0, float(d["score"]))), 5),
            "observationTags": f"name:{name}" if name else "",
            "observationComments": f"deer-reid state: {d['state']}",
        })
    deployment_rows = [{"deploymentID": d["deploymentID"], "locationID": d["locationID"],
                        "locationName": d["locationName"], "latitude": d["latitude"], "longitude": d["longitude"],
                        "deploymentStart": _ts(d["start"]), "deploymentEnd": _ts(d["end"]), "cameraID": d["cameraID"]}
                       for d in deployments.values()]
    lats = [d["latitude"] for d in deployments.values()]
    lons = [d["longitude"] for d in deployments.values()]
    created = snapshot["created"]
    label = title or f"deer-reid export of {snapshot['property'] or 'all properties'}"
    package = {
        "profile": f"{CAMTRAP_BASE}/camtrap-dp-profile.json",
        "name": "deer-reid-export",
        "created": _ts(created),
        "title": label,
        "contributors": [{"title": contributor, "role": "contact"}],
        "project": {"title": label, "samplingDesign": "opportunistic", "captureMethod": ["activityDetection"],
                    "individualAnimals": True, "observationLevel": ["media"]},
        "spatial": {"type": "Polygon", "coordinates": [[[min(lons), min(lats)], [max(lons), min(lats)],
                                                        [max(lons), max(lats)], [min(lons), max(lats)],
                                                        [min(lons), min(lats)]]]},
        "temporal": {"start": min(d["captured_at"] for d in dets).date().isoformat(),
                     "end": max(d["captured_at"] for d in dets).date().isoformat()},
        "taxonomic": [{"scientificName": scientific_name, "taxonRank": taxon_rank}],
        "resources": [{"name": name, "path": f"{name}.csv", "profile": "tabular-data-resource", "format": "csv",
                       "mediatype": "text/csv", "encoding": "utf-8",
                       "schema": f"{CAMTRAP_BASE}/{name}-table-schema.json"}
                      for name in ("deployments", "media", "observations")],
    }
    return package, {"deployments.csv": deployment_rows, "media.csv": list(media.values()),
                     "observations.csv": observations}


# --- writing ----------------------------------------------------------------------------------------

def csv_text(rows: list[dict], fields: list[str] | None = None) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields or (list(rows[0]) if rows else []), lineterminator="\n",
                            restval="", extrasaction="raise")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def files_of(snapshot: dict, fmt: str, **camtrap_options) -> dict[str, str]:
    """{file name: text} of an export in `fmt` ('csv' or 'camtrap-dp')."""
    if fmt == "csv":
        return {name: csv_text(rows) for name, rows in csv_tables(snapshot).items()}
    if fmt == "camtrap-dp":
        package, tables = camtrap_dp(snapshot, **camtrap_options)
        return {"datapackage.json": json.dumps(package, indent=2),
                **{name: csv_text(rows, CAMTRAP_FIELDS[name]) for name, rows in tables.items()}}
    raise ExportError(f"unknown format {fmt!r}: csv or camtrap-dp")


def zip_bytes(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()
