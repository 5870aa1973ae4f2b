"""The HTTP API: uploads in, detection states and results out.

An upload is validated completely (every file, every field) before anything is
stored; then the originals go to the content-addressed blob store and the
image, detection and outbox rows are written in one transaction. The
reconciler's relay publishes the detection events from the outbox.
"""
from __future__ import annotations

import asyncio
import errno
import os
import re
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

from services.api import census, people, web
from services.api.auth import Admin, Reader, Reviewer
from services.api.guards import BodyDeadline, OriginPolicy, RateLimit, parse_networks
from services.api.deps import Config, Pool
from services.api.uploads import PlannedImage, UploadRejected, expand_archive, parse_detections, parse_time, \
    plan_image, safe_file_name
from shared import sites
from shared.archives import Limits, is_archive
from shared.config import Settings, get_settings
from shared.db import OUTBOX_CHANNEL, create_pool
from shared.broker import is_transient
from shared.observability import ERRORS, EVENTS, STAGE_SECONDS, metrics_endpoint
from shared.schemas import DetectionClass, PipelineConfig

router = APIRouter()
DATABASE_RETRY_AFTER_S = 5  # what a client is told to wait while the database restarts
JSON_BODY_LIMIT = 2 * 1024 * 1024  # decisions, merges, splits (up to 10,000 detection ids), edits
SIGHTING_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")


def store_blob(root: Path, sha256: str, data: bytes) -> Path:
    """Write an original image under its checksum (atomic; a second write of the same bytes is a no-op)."""
    path = root / sha256[:2] / sha256
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{sha256}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            tmp.unlink(missing_ok=True)  # a partial file never stays behind
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UploadRejected(f"the image store ({root}) is full: nothing was stored; free space or move "
                                     "DEER_BLOB_DIR, then upload again", status=507) from None
            raise
        tmp.replace(path)
    return path


async def read_limited(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise UploadRejected(f"file is over the limit of {limit} bytes", status=413, file=upload.filename)
    return data


async def read_files(files: list[UploadFile], settings: Settings) -> list[tuple[str, bytes]]:
    """Each uploaded file as (name, bytes); an archive counts as its images (read off the event loop, within
    what a plain upload may hold: its images count against the file limit, its bytes against the request's)."""
    sources: list[tuple[str, bytes]] = []
    for f in files:
        head = await f.read(512)
        await f.seek(0)
        if is_archive(head, f.filename or ""):
            limits = Limits(max_entry_bytes=settings.max_upload_bytes, max_entries=4 * settings.max_files_per_upload,
                            max_total_bytes=settings.max_request_bytes)
            sources += await asyncio.to_thread(expand_archive, safe_file_name(f.filename), f.file, limits)
        else:
            sources.append((safe_file_name(f.filename), await read_limited(f, settings.max_upload_bytes)))
        if len(sources) > settings.max_files_per_upload:
            raise UploadRejected(f"over {settings.max_files_per_upload} images in one upload (archives count "
                                 f"their images)", status=413)
    return sources


async def property_of(conn: asyncpg.Connection, site: str) -> str:
    """The property a site belongs to; a site seen for the first time joins the default property."""
    await conn.execute("INSERT INTO sites (name, property) VALUES ($1, 'default') ON CONFLICT DO NOTHING", site)
    # FOR SHARE: a move of the site (sites.put_site, FOR UPDATE) waits for this upload to commit and then
    # sees its detections, or this upload waits for the move and reads the new property; never one site's
    # detections in two properties.
    return await conn.fetchval("SELECT property FROM sites WHERE name = $1 FOR SHARE", site)


SIGHTING_NAMESPACE = uuid.UUID("0f5e3c1e-6a51-4f0b-9d8e-5c7a2b1d4e90")


async def sighting_of(conn: asyncpg.Connection, im: PlannedImage, prop: str, key: str | None,
                      gap_s: float) -> uuid.UUID | None:
    """The sighting an image's one animal belongs to: the frames of one burst are one animal.

    Only a frame with exactly one detection joins a sighting (with two animals in view, which one
    walked on is unknown). An explicit `sighting` key from the uploader (a camera's burst or sequence
    id) names it; otherwise frames of the same site and camera within `gap_s` seconds of each other
    join one, but only when their capture time is real (request, EXIF or file name): a fallback time
    is the same invented instant for a whole folder.
    """
    if len(im.detections) != 1:
        return None
    if key:
        return uuid.uuid5(SIGHTING_NAMESPACE, f"{prop}/{im.site}/{im.camera}/{key}")
    if gap_s <= 0 or im.time_source == "fallback":
        return None
    # one uploader at a time per camera: two frames of a burst uploaded at once must not found two sightings
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 11))", f"{im.site}/{im.camera}")
    near = await conn.fetchval(
        """SELECT d.sighting FROM detections d JOIN images i ON i.sha256 = d.image_sha256
           WHERE d.site = $1 AND d.camera = $2 AND d.sighting IS NOT NULL AND i.time_source <> 'fallback'
             AND d.captured_at BETWEEN $3::timestamptz - make_interval(secs => $4::float8)
                                   AND $3::timestamptz + make_interval(secs => $4::float8)
           ORDER BY abs(extract(epoch FROM d.captured_at - $3::timestamptz)) LIMIT 1""",
        im.site, im.camera, im.captured_at, gap_s)
    return near or uuid.uuid4()


async def persist(pool: asyncpg.Pool, images: list[PlannedImage], sighting: str | None = None,
                  gap_s: float = 0.0) -> list[dict]:
    """Insert images, detections and outbox rows in one transaction; a known image is a no-op."""
    out = []
    async with pool.acquire() as conn, conn.transaction():
        for im in images:
            prop = await property_of(conn, im.site)
            inserted = await conn.fetchval(
                """INSERT INTO images (sha256, byte_size, width, height, format, original_name, site, camera,
                                       captured_at, time_source)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (sha256) DO NOTHING
                   RETURNING sha256""",
                im.sha256, len(im.data), im.width, im.height, im.format, im.name, im.site, im.camera,
                im.captured_at, im.time_source)
            if inserted:
                group = await sighting_of(conn, im, prop, sighting, gap_s)
                await conn.executemany(
                    """INSERT INTO detections (id, image_sha256, ordinal, box, cls, detector_confidence, site,
                                               camera, captured_at, crop, property, sighting, source_label)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)""",
                    [(d.id, im.sha256, d.ordinal, list(d.box), d.cls, d.confidence, im.site, im.camera,
                      im.captured_at, d.crop, prop, group, d.label) for d in im.detections])
                await conn.execute("INSERT INTO outbox (detection_id) SELECT unnest($1::uuid[])",
                                   [d.id for d in im.detections])
                await conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")  # delivered at commit: wakes the relay
            rows = await conn.fetch(
                "SELECT id, state FROM detections WHERE image_sha256 = $1 ORDER BY ordinal", im.sha256)
            out.append({"name": im.name, "sha256": im.sha256, "duplicate": not inserted,
                        "captured_at": im.captured_at.isoformat(), "time_source": im.time_source,
                        "detections": [{"id": str(r["id"]), "state": r["state"]} for r in rows]})
    return out


@router.post("/v1/uploads", status_code=201)
async def upload(
    pool: Pool,
    settings: Config,
    _: Reviewer,
    files: Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, WebP), or zip or tar "
                                                         "archives of them")],
    site: Annotated[str | None, Form(description="beats a SITE_YYYYMMDD_HHMMSS file name")] = None,
    fallback_site: Annotated[str | None, Form(description="used only when neither gives a site")] = None,
    camera: Annotated[str | None, Form()] = None,
    captured_at: Annotated[str | None, Form(description="ISO-8601 with zone; beats EXIF and file name")] = None,
    fallback_captured_at: Annotated[str | None, Form(description="used only when nothing else gives a time")] = None,
    cls: Annotated[DetectionClass, Form(description="class of a whole-image detection")] = DetectionClass.unknown,
    detections: Annotated[str | None, Form(description="JSON boxes: a list, or {file name: list}")] = None,
    sighting: Annotated[str | None, Form(description="burst/sequence key: single-animal frames sharing it are "
                                                     "one animal (default: same camera within "
                                                     "DEER_SIGHTING_GAP_S seconds)")] = None,
):
    with STAGE_SECONDS.labels("api", "upload").time():
        if len(files) > settings.max_files_per_upload:
            raise UploadRejected(f"{len(files)} files in one upload; at most {settings.max_files_per_upload}",
                                 status=413)
        for label, value in (("site", site), ("fallback_site", fallback_site), ("camera", camera)):
            if value is not None and not sites.NAME.match(value):  # refused even where another field wins
                raise UploadRejected(f"{label} {value[:100]!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if sighting is not None and not SIGHTING_KEY.match(sighting):
            raise UploadRejected("sighting must be 1-100 letters, digits, '.', '_', ':' or '-'")
        sources = await read_files(files, settings)
        names = [name for name, _ in sources]
        if len(set(names)) != len(names):
            raise UploadRejected("two files in one upload have the same name")
        when = parse_time(captured_at, "captured_at") if captured_at else None
        fallback = parse_time(fallback_captured_at, "fallback_captured_at") if fallback_captured_at else None
        boxes = parse_detections(detections, names)
        now = datetime.now(timezone.utc)
        planned = []
        for name, data in sources:
            # Decoding and cropping are CPU work: keep the event loop answering.
            planned.append(await asyncio.to_thread(
                plan_image, name, data, boxes[name], site=site, fallback_site=fallback_site, camera=camera, captured_at=when,
                fallback_time=fallback, whole_image_cls=cls, max_bytes=settings.max_upload_bytes,
                max_pixels=settings.max_pixels, crop_max_side=settings.crop_max_side, now=now))
        for im in planned:
            await asyncio.to_thread(store_blob, settings.blobs, im.sha256, im.data)
        images = await persist(pool, planned, sighting, settings.sighting_gap_s)
    EVENTS.labels("api", "upload").inc(len(images))
    status = 201 if any(not i["duplicate"] for i in images) else 200
    return JSONResponse({"images": images}, status_code=status)


class StatesQuery(BaseModel):
    ids: list[UUID] = Field(max_length=5000)


@router.post("/v1/detections/states")
async def detection_states(query: StatesQuery, pool: Pool, _: Reader):
    """States and individuals of many detections at once (what `deer-reid ingest --wait` and the census eval poll)."""
    rows = await pool.fetch("SELECT id, state, individual_id FROM detections WHERE id = ANY($1::uuid[])", query.ids)
    states = {str(r["id"]): r["state"] for r in rows}
    return {"states": states, "individuals": {str(r["id"]): r["individual_id"] for r in rows},
            "missing": [str(i) for i in query.ids if str(i) not in states]}


@router.get("/v1/detections/{detection_id}")
async def detection(detection_id: UUID, pool: Pool, _: Reader):
    row = await pool.fetchrow(
        """SELECT id, image_sha256, ordinal, box, cls, detector_confidence, site, camera, captured_at, state,
                  state_reason, attempts, individual_id, score, result, decided_by, created_at, updated_at
           FROM detections WHERE id = $1""", detection_id)
    if row is None:
        raise HTTPException(404, detail={"error": f"no detection {detection_id}"})
    return {k: (str(v) if isinstance(v, UUID) else v) for k, v in dict(row).items()}


@router.get("/v1/config")
async def get_config(pool: Pool, _: Reader):
    """The run-time switches (mode, ensemble, temporal, coat, pose, antler) applied to every detection
    published from now on."""
    row = await pool.fetchrow("SELECT value, updated_at, updated_by FROM runtime_config WHERE key = 'pipeline'")
    return {**PipelineConfig(**row["value"]).model_dump(), "updated_at": row["updated_at"],
            "updated_by": row["updated_by"]}


class PipelineUpdate(BaseModel):
    """A change of some switches; the ones left out keep their values."""

    model_config = {"extra": "forbid"}
    # Not nullable: a field is either left out (unchanged) or given a value; null is refused.
    mode: Literal["fast", "enhanced"] = Field(None, validate_default=False)
    ensemble: bool = Field(None, validate_default=False)
    temporal: bool = Field(None, validate_default=False)
    coat: bool = Field(None, validate_default=False)
    pose: bool = Field(None, validate_default=False)
    antler: bool = Field(None, validate_default=False)


@router.put("/v1/config")
async def put_config(update: PipelineUpdate, pool: Pool, who: Admin):
    """Change switches (a partial update); no service restarts. Every change is kept in
    runtime_config_history. Detections already published keep the switches they were published with."""
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchval("SELECT value FROM runtime_config WHERE key = 'pipeline' FOR UPDATE")
        config = PipelineConfig(**{**(current or {}), **update.model_dump(exclude_unset=True)}).model_dump()
        await conn.execute(
            "UPDATE runtime_config SET value = $1, updated_at = now(), updated_by = $2 WHERE key = 'pipeline'",
            config, who.owner)
        await conn.execute("INSERT INTO runtime_config_history (key, value, changed_by) VALUES ('pipeline', $1, $2)",
                           config, who.owner)
    return await get_config(pool, who)


class SiteIn(BaseModel):
    """A camera site: its property (the population it belongs to) and, optionally, where it is."""

    model_config = {"extra": "forbid"}
    property: str = Field("default", pattern=sites.NAME_PATTERN)
    lat: float | None = Field(None, ge=-90, le=90)
    lon: float | None = Field(None, ge=-180, le=180)


@router.get("/v1/sites")
async def list_sites(pool: Pool, _: Reader):
    """Every site with its property and coordinates."""
    return {"sites": await sites.list_sites(pool)}


@router.put("/v1/sites/{name}")
async def put_site(name: str, site: SiteIn, pool: Pool, _: Admin):
    """Register or move a site (a property named for the first time is created)."""
    try:
        return await sites.put_site(pool, name, site.property, site.lat, site.lon)
    except sites.SiteError as exc:
        raise HTTPException(exc.status, detail={"error": str(exc)}) from None


@router.get("/v1/calibration")
async def calibration(pool: Pool, _: Reader):
    """The active fusion calibration (per-component calibrations, weights, thresholds), or 404."""
    row = await pool.fetchrow("SELECT id, artifact, created_at FROM calibrations WHERE active AND property IS NULL "
                              "ORDER BY id DESC LIMIT 1")
    if row is None:
        raise HTTPException(404, detail={"error": "no calibration installed: run `deer-reid eval --protocol loo`"})
    return {"id": row["id"], "created_at": row["created_at"], "artifact": row["artifact"]}


@router.post("/v1/calibration", status_code=201)
async def install_calibration(artifact: dict, pool: Pool, who: Admin):
    """Install a calibration artifact (`deer-reid eval --protocol loo` writes one); it becomes the active one."""
    from shared.calibration_artifact import ArtifactError, install

    try:
        async with pool.acquire() as conn:
            found = await install(conn, artifact, created_by=who.owner)
    except ArtifactError as exc:
        raise HTTPException(422, detail={"error": str(exc)}) from None
    return {"id": found}


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    """The API's own address opens the page."""
    return RedirectResponse("/ui/", status_code=307)


@router.get("/healthz")
async def healthz(pool: Pool):
    try:
        await pool.fetchval("SELECT 1")
    except (OSError, asyncpg.PostgresError) as exc:
        return JSONResponse({"service": "api", "ready": False, "error": repr(exc)}, status_code=503)
    return {"service": "api", "ready": True}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.pool = await create_pool(settings.database_url)
        try:
            yield
        finally:
            await app.state.pool.close()

    # Bodies are bounded before anything parses them: the whole request, the multipart parts (files,
    # fields, the size of a field), and the JSON bodies of the people's API.
    app = FastAPI(title="deer-reid", version="1", lifespan=lifespan, max_body_size=settings.max_request_bytes)
    app.include_router(router, form_limits={"max_files": settings.max_files_per_upload, "max_fields": 32,
                                            "max_part_size": 1024 * 1024})
    app.include_router(people.router, max_body_size=JSON_BODY_LIMIT)
    app.include_router(census.router, max_body_size=JSON_BODY_LIMIT)
    app.include_router(web.router, max_body_size=64 * 1024)
    web.mount_static(app)
    app.add_route("/metrics", metrics_endpoint)
    # Outermost first: the cheapest refusals come before anything reads the request.
    origins = frozenset(o.strip().rstrip("/") for o in settings.cors_origins.split(",") if o.strip())
    app.add_middleware(BodyDeadline, seconds=settings.request_body_timeout_s)
    app.add_middleware(CORSMiddleware, allow_origins=sorted(origins), allow_methods=["*"],
                       allow_headers=["Authorization", "Content-Type", "X-Deer-Page"])
    app.add_middleware(OriginPolicy, allowed=origins)
    app.add_middleware(RateLimit, per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst,
                       trusted_proxies=parse_networks(settings.trusted_proxies))
    app.dependency_overrides[get_settings] = lambda: settings

    @app.exception_handler(OSError)
    @app.exception_handler(asyncpg.PostgresConnectionError)
    @app.exception_handler(asyncpg.InterfaceError)
    @app.exception_handler(asyncpg.CannotConnectNowError)
    async def database_away(_: Request, exc: Exception):
        """The database restarting (or out of reach): 503 with Retry-After, never a 500, and the request's
        transaction rolled back whole. Anything else that raised is a bug and stays a 500."""
        if not is_transient(exc):
            raise exc
        ERRORS.labels("api", "database-away").inc()
        return JSONResponse({"error": "the database is not reachable right now; try again shortly"},
                            status_code=503, headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})

    @app.exception_handler(OverflowError)
    @app.exception_handler(asyncpg.DataError)
    async def out_of_range(_: Request, exc: Exception):
        """A value the schema lets through but the database cannot hold (an id past 64 bits, a NUL in text):
        the request is refused, its transaction rolled back."""
        EVENTS.labels("api", "rejected").inc()
        return JSONResponse({"error": f"a value of the request is out of range: {str(exc)[:200]}"}, status_code=422)

    @app.exception_handler(UploadRejected)
    async def rejected(_: Request, exc: UploadRejected):
        EVENTS.labels("api", "rejected").inc()
        return JSONResponse({"error": str(exc), "file": exc.file}, status_code=exc.status)

    return app
