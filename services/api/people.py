"""The people's API: individuals, the review queue, decisions, merges and splits, undo, photos,
statistics and exports.

Reads need the `read` scope (open on a loopback-only API); every change needs `review`, and is made
by `curation` in one transaction and recorded under the key's owner.
"""
from __future__ import annotations

import asyncio
import io
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, HTTPException, Path, Query, Response
from pydantic import BaseModel, Field, field_validator

from services.api import browse, curation, exports
from services.api.auth import Reader, Reviewer
from services.api.deps import Config, Pool

router = APIRouter(prefix="/v1")
NAME = r"^[^\x00-\x1f<>]{1,100}$"  # shown everywhere: no control characters, no markup


# --- reading ----------------------------------------------------------------------------------------

@router.get("/individuals", tags=["individuals"])
async def list_individuals(
    pool: Pool, _: Reader,
    property: str | None = None,
    site: str | None = Query(None, description="seen at this site"),
    sex: Literal["male", "female", "unknown"] | None = None,
    cls: str | None = Query(None, description="seen as this class (buck, doe, ...)"),
    seen_from: datetime | None = Query(None, description="last seen on or after"),
    seen_to: datetime | None = Query(None, description="first seen on or before"),
    min_sightings: int = Query(0, ge=0),
    flag: str | None = Query(None, description="has a detection with this fusion flag"),
    q: str | None = Query(None, max_length=100, description="name, notes, tag or id"),
    include_merged: bool = False,
    limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
):
    return await browse.list_individuals(pool, prop=property, site=site, sex=sex, cls=cls, seen_from=seen_from,
                                         seen_to=seen_to, min_sightings=min_sightings, flag=flag, q=q,
                                         include_merged=include_merged, limit=limit, offset=offset)


@router.get("/individuals/{individual_id}", tags=["individuals"])
async def individual(individual_id: int, pool: Pool, _: Reader):
    """The profile: timeline, sites, 24-hour pattern, best photo per viewpoint, antler history, similar
    individuals with each component's score."""
    found = await browse.profile(pool, individual_id)
    if found is None:
        raise HTTPException(404, detail={"error": f"no individual {individual_id}"})
    return found


@router.get("/review", tags=["review"])
async def review_queue(pool: Pool, _: Reader, property: str | None = None,
                       order: Literal["oldest", "uncertain"] = "oldest",
                       flagged: bool = Query(True, description="also fusion's placements flagged "
                                                                 + ", ".join(browse.QUEUE_FLAGS)),
                       limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0),
                       candidates: int = Query(3, ge=1, le=10)):
    return await browse.review_queue(pool, prop=property, order=order, flagged=flagged, limit=limit, offset=offset,
                                     candidates=candidates)


@router.get("/audit", tags=["review"])
async def audit_log(pool: Pool, _: Reader, detection: UUID | None = None, individual: int | None = None,
                    limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)):
    return {"entries": await browse.audit(pool, limit=limit, offset=offset, detection=detection,
                                          individual=individual)}


@router.get("/stats", tags=["statistics"])
async def statistics(pool: Pool, _: Reader):
    """Detections by state, each enhancement's coverage, timings per stage."""
    return await browse.statistics(pool)


@router.get("/detections/{detection_id}/crop", tags=["photos"], response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}})
async def crop(detection_id: UUID, pool: Pool, _: Reader):
    data = await pool.fetchval("SELECT crop FROM detections WHERE id = $1", detection_id)
    if data is None:
        raise HTTPException(404, detail={"error": f"no detection {detection_id}"})
    return Response(bytes(data), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/detections/{detection_id}/image", tags=["photos"], response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}})
async def detection_image(detection_id: UUID, pool: Pool, settings: Config, _: Reader, box: bool = True,
                          max_side: int = Query(1600, ge=64, le=8000)):
    """The whole photo, the detection's box drawn on request."""
    row = await pool.fetchrow("SELECT image_sha256, box FROM detections WHERE id = $1", detection_id)
    if row is None:
        raise HTTPException(404, detail={"error": f"no detection {detection_id}"})
    path = settings.blobs / row["image_sha256"][:2] / row["image_sha256"]
    if not path.exists():
        raise HTTPException(410, detail={"error": "the original image is no longer stored"})
    data = await asyncio.to_thread(_render, path, list(row["box"]) if box else None, max_side)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


def _render(path, box: list[int] | None, max_side: int) -> bytes:
    from PIL import Image, ImageDraw, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        if box:
            width = max(2, round(max(im.size) / 300))
            ImageDraw.Draw(im).rectangle(box, outline=(255, 200, 0), width=width)
        im.thumbnail((max_side, max_side))
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=85)
        return out.getvalue()


@router.get("/images/{sha256}", tags=["photos"], response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def original_image(pool: Pool, settings: Config, _: Reader,
                         sha256: str = Path(pattern="^[0-9a-f]{64}$")):
    """The uploaded file itself, byte for byte (what `deer-reid export --with-media` writes)."""
    fmt = await pool.fetchval("SELECT format FROM images WHERE sha256 = $1", sha256)
    if fmt is None:
        raise HTTPException(404, detail={"error": f"no image {sha256}"})
    path = settings.blobs / sha256[:2] / sha256
    if not path.exists():
        raise HTTPException(410, detail={"error": "the original image is no longer stored"})
    data = await asyncio.to_thread(path.read_bytes)
    return Response(data, media_type=exports.MEDIA_TYPES.get(fmt, "application/octet-stream"),
                    headers={"Cache-Control": "private, max-age=86400"})


@router.get("/export", tags=["exports"], response_class=Response,
            responses={200: {"content": {"application/zip": {}}}})
async def export(pool: Pool, _: Reader, format: Literal["csv", "camtrap-dp"] = "csv", property: str | None = None,
                 scientific_name: str = Query("Cervidae", max_length=200)):
    """A zip of the export: CSV tables, or a Camtrap DP 1.0.2 data package."""
    snapshot = await exports.load(pool, property)
    try:
        files = exports.files_of(snapshot, format, **({"scientific_name": scientific_name}
                                                      if format == "camtrap-dp" else {}))
    except exports.ExportError as exc:
        raise HTTPException(422, detail={"error": str(exc)}) from None
    name = f"deer-reid-{format}.zip"
    return Response(exports.zip_bytes(files), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


# --- changing ---------------------------------------------------------------------------------------

class Reason(BaseModel):
    model_config = {"extra": "forbid"}
    reason: str = Field("", max_length=2000)


class DecisionIn(Reason):
    action: Literal["confirm", "assign", "new"]
    individual_id: int | None = Field(None, ge=1)


class MergeIn(Reason):
    keep: int = Field(ge=1)
    absorb: int = Field(ge=1)


class SplitIn(Reason):
    detections: list[UUID] = Field(min_length=1, max_length=10000)
    name: str | None = Field(None, pattern=NAME)


class IndividualEdit(Reason):
    """Fields left out keep their values; a null name removes it."""
    name: str | None = Field(None, pattern=NAME)
    notes: str = Field(None, max_length=10000, validate_default=False)
    tags: list[Annotated[str, Field(pattern=r"^[^\x00-\x1f<>,;]{1,40}$")]] = Field(None, max_length=50,
                                                                                    validate_default=False)

    @field_validator("tags")
    @classmethod
    def _unique(cls, tags: list[str]) -> list[str]:
        return list(dict.fromkeys(t.strip() for t in tags if t.strip()))


async def _change(pool, fn, *args, **kwargs) -> dict:
    """Run one curation change in its own transaction; its refusals become HTTP answers."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            return await fn(conn, *args, **kwargs)
    except curation.CurationError as exc:
        raise HTTPException(exc.status, detail={"error": str(exc)}) from None


@router.post("/detections/{detection_id}/decision", tags=["review"])
async def decide(detection_id: UUID, body: DecisionIn, pool: Pool, settings: Config, who: Reviewer):
    """A review decision: confirm fusion's candidate, assign another individual, or declare a new one.
    A detection a person already decided answers 409 (use `reassign`)."""
    return await _change(pool, curation.decide, who.owner, settings.exemplars_per_individual, detection_id,
                         body.action, body.individual_id, body.reason)


@router.post("/detections/{detection_id}/reassign", tags=["review"])
async def reassign(detection_id: UUID, body: DecisionIn, pool: Pool, settings: Config, who: Reviewer):
    """Move one decided detection to another individual (or a new one), whoever decided it before."""
    return await _change(pool, curation.decide, who.owner, settings.exemplars_per_individual, detection_id,
                         body.action, body.individual_id, body.reason, override=True)


@router.post("/individuals/merge", tags=["individuals"])
async def merge(body: MergeIn, pool: Pool, settings: Config, who: Reviewer):
    """`absorb`'s sightings join `keep`; `absorb` remains as a pointer (merged_into)."""
    return await _change(pool, curation.merge, who.owner, settings.exemplars_per_individual, body.keep,
                         body.absorb, body.reason)


@router.post("/individuals/{individual_id}/split", tags=["individuals"])
async def split(individual_id: int, body: SplitIn, pool: Pool, settings: Config, who: Reviewer):
    """The chosen detections become a new individual."""
    return await _change(pool, curation.split, who.owner, settings.exemplars_per_individual, individual_id,
                         body.detections, body.reason, body.name)


@router.patch("/individuals/{individual_id}", tags=["individuals"])
async def edit_individual(individual_id: int, body: IndividualEdit, pool: Pool, settings: Config, who: Reviewer):
    fields = body.model_dump(exclude_unset=True, exclude={"reason"})
    if not fields:
        raise HTTPException(422, detail={"error": "nothing to change: name, notes or tags"})
    return await _change(pool, curation.edit, who.owner, settings.exemplars_per_individual, individual_id,
                         fields, body.reason)


@router.post("/audit/{audit_id}/undo", tags=["review"])
async def undo(audit_id: int, body: Reason, pool: Pool, settings: Config, who: Reviewer):
    """Undo one change, while nothing it touched has changed since (else 409)."""
    return await _change(pool, curation.undo, who.owner, settings.exemplars_per_individual, audit_id, body.reason)
