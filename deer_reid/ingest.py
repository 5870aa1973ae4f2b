"""`deer-reid ingest`: upload images to the running API, and optionally wait for every result."""
from __future__ import annotations

import asyncio
import mimetypes
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import httpx
from tqdm import tqdm

from shared.archives import ARCHIVE_SUFFIXES, IMAGE_SUFFIXES, ArchiveRejected, Limits, is_archive, read_entries
from shared.states import TERMINAL

@dataclass(frozen=True)
class Item:
    """One image to upload (`data`), or one refused before sending (`error`); `label` says where it came
    from: its path, or `archive.zip!folder/entry.jpg`."""

    label: str
    name: str
    data: bytes | None = None
    error: str | None = None
    status: int | None = None
    fields: dict[str, str] | None = None  # this image's own form fields (site, boxes, time, sighting)


def find_files(path: Path) -> list[Path]:
    """The images and archives under `path` (recursively), or `path` itself, in a stable order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    return sorted(p for p in path.rglob("*") if p.is_file() and (
        p.suffix.lower() in IMAGE_SUFFIXES or p.name.lower().endswith(ARCHIVE_SUFFIXES)))


def archive_items(path: Path, limits: Limits) -> Iterator[Item]:
    """An archive's entries as items, read one at a time. An entry refused is an item with its reason; an
    archive that cannot be read on ends with one item saying why (the entries before it stand)."""
    with open(path, "rb") as f:
        try:
            for entry in read_entries(f, limits):
                yield Item(f"{path}!{entry.name}", entry.file_name, entry.data, entry.error,
                           entry.status if entry.error else None)
        except ArchiveRejected as exc:
            yield Item(str(path), path.name, error=str(exc), status=exc.status)


def items_of(path: Path, limits: Limits) -> Iterator[Item]:
    """What `deer-reid ingest PATH` sends: a folder's images and archives (recursively), one image, or one
    archive's images; each file is read only when its turn comes."""
    for p in find_files(path):
        if p.suffix.lower() not in IMAGE_SUFFIXES and _is_archive_file(p):  # an image is opened once
            yield from archive_items(p, limits)
        else:
            yield Item(str(p), p.name, p.read_bytes())


def _is_archive_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return is_archive(f.read(512), path.name)


def _retry_after(value: str | None) -> float:
    """Seconds to wait from a Retry-After header (a number of seconds; anything else, such as a date, is 1)."""
    try:
        return min(max(float(value), 0.0), 30.0)
    except (TypeError, ValueError):
        return 1.0


async def upload_one(client: httpx.AsyncClient, item: Item, fields: dict[str, str], retries: int = 5) -> dict:
    """POST one image; returns the API's answer for it, or {"error", "status"}; retries server trouble and
    the rate limit's 429 (after the Retry-After it gives), never a refusal."""
    mime = mimetypes.guess_type(item.name)[0] or "application/octet-stream"
    for attempt in range(retries + 1):
        try:
            resp = await client.post("/v1/uploads", data={**fields, **(item.fields or {})},
                                     files=[("files", (item.name, item.data, mime))])
        except httpx.TransportError as exc:
            if attempt == retries:
                return {"path": item.label, "status": None, "error": f"transport: {exc!r}"}
        else:
            if resp.status_code in (429, 503) and attempt < retries:
                # the API's rate limit, or its database restarting: wait as it asks
                await asyncio.sleep(_retry_after(resp.headers.get("retry-after")))
                continue
            if resp.status_code < 500:
                body = resp.json()
                if resp.status_code >= 400:
                    return {"path": item.label, "status": resp.status_code, "error": body.get("error", body)}
                return {"path": item.label, "status": resp.status_code, **body["images"][0]}
            if attempt == retries:
                return {"path": item.label, "status": resp.status_code, "error": resp.text[:500]}
        await asyncio.sleep(min(0.5 * 2 ** attempt, 8))
    raise AssertionError("unreachable")


async def upload_all(api_url: str, items: Iterable[Path | Item], fields: dict[str, str], concurrency: int = 4,
                     progress: bool = True, headers: dict[str, str] | None = None) -> list[dict]:
    """Upload every item, `concurrency` at a time, one image per request; the answers in the items' order.
    Items are drawn one at a time (an archive is never read whole), off the event loop."""
    source = enumerate(items)
    taking = asyncio.Lock()
    results: dict[int, dict] = {}
    bar = tqdm(desc="upload", unit="img", disable=not progress)

    def draw() -> tuple[int, Item] | None:
        i, nxt = next(source, (None, None))
        if i is None:
            return None
        return i, nxt if isinstance(nxt, Item) else Item(str(nxt), Path(nxt).name, Path(nxt).read_bytes())

    async with httpx.AsyncClient(base_url=api_url, timeout=120, headers=headers) as client:
        async def worker() -> None:
            while True:
                async with taking:
                    drawn = await asyncio.to_thread(draw)
                if drawn is None:
                    return
                i, item = drawn
                if item.error is not None:
                    results[i] = {"path": item.label, "status": item.status, "error": item.error}
                else:
                    results[i] = await upload_one(client, item, fields)
                bar.update(1)

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    bar.close()
    return [results[i] for i in sorted(results)]


async def wait_terminal(api_url: str, ids: list[str], timeout: float | None = None, progress: bool = True,
                        poll_s: float = 1.0, headers: dict[str, str] | None = None) -> dict[str, str]:
    """Poll until every detection is in a terminal state (or the timeout passes); returns id -> state."""
    states: dict[str, str] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=len(ids), desc="results", unit="det", disable=not progress)
    async with httpx.AsyncClient(base_url=api_url, timeout=60, headers=headers) as client:
        while True:
            pending = [i for i in ids if states.get(i) not in TERMINAL]
            for start in range(0, len(pending), 2000):
                chunk = pending[start:start + 2000]
                try:
                    resp = await client.post("/v1/detections/states", json={"ids": chunk})
                    resp.raise_for_status()
                    states.update(resp.json()["states"])
                except httpx.HTTPError:
                    break  # the API is restarting: ask again next round
            done = sum(1 for i in ids if states.get(i) in TERMINAL)
            bar.n = done
            bar.refresh()
            if done == len(ids) or (deadline is not None and time.monotonic() > deadline):
                break
            await asyncio.sleep(poll_s)
    bar.close()
    return states


class IngestRefused(ValueError):
    """Nothing was sent: the input as a whole cannot be read (its messages say why)."""

    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages[:5]))
        self.messages = messages


async def ensure_sites(client: httpx.AsyncClient, wanted: dict[str, tuple[float, float]],
                       prop: str) -> dict[str, str]:
    """Register the sites of a Camtrap DP package (with their coordinates) in `prop`; returns {site: why its
    media are left out} for each site that already belongs to another property (sites are never moved)."""
    resp = await client.get("/v1/sites")
    resp.raise_for_status()
    known = {s["name"]: s for s in resp.json()["sites"]}
    clashes = {}
    for name, (lat, lon) in sorted(wanted.items()):
        have = known.get(name)
        if have is not None and have["property"] != prop:
            clashes[name] = (f"site {name!r} belongs to property {have['property']!r}, not {prop!r}: give "
                             f"--property {have['property']} or rename the deployment's location")
            continue
        if have is not None and have["lat"] == lat and have["lon"] == lon:
            continue
        put = await client.put(f"/v1/sites/{name}", json={"property": prop, "lat": lat, "lon": lon})
        if put.status_code >= 400:
            raise IngestRefused([f"registering site {name!r}: {put.status_code} {put.text[:300]}"])
    return clashes


async def ingest(api_url: str, path: Path, *, site: str | None, fallback_site: str | None = None,
                 camera: str | None, captured_at: str | None, wait: bool, timeout: float | None = None,
                 concurrency: int = 4, progress: bool = True, headers: dict[str, str] | None = None,
                 max_image_bytes: int = 50 * 1024 * 1024, detections: Path | None = None, min_conf: float = 0.2,
                 cls: str = "unknown", cls_map: Path | None = None, camtrap_dp: bool = False,
                 taxon: str | None = None, prop: str = "default") -> dict:
    """Upload a folder, an image or an archive; or a folder with its MegaDetector output (`detections`:
    animal boxes only, empty frames skipped); or a Camtrap DP package (`camtrap_dp`). Raises
    IngestRefused when the input as a whole cannot be read, before anything is sent."""
    from deer_reid import ingest_sources
    from deer_reid.sources import camtrap, megadetector

    fields = {k: v for k, v in (("site", site), ("fallback_site", fallback_site), ("camera", camera),
                                ("fallback_captured_at", captured_at)) if v}
    find_files(path)  # a path that is not there fails here, before anything is sent
    source_report: dict = {}
    if camtrap_dp:
        try:
            package = await asyncio.to_thread(camtrap.read, path, taxon=taxon)
        except camtrap.PackageRefused as exc:
            raise IngestRefused(exc.messages) from None
        async with httpx.AsyncClient(base_url=api_url, timeout=60, headers=headers) as client:
            wanted = {d.site: (d.lat, d.lon) for d in package.deployments.values()}
            clashes = await ensure_sites(client, wanted, prop)
        package.problems += clashes.values()
        package.observations = [o for o in package.observations
                                if package.deployments[package.media[o.media].deployment].site not in clashes]
        items, source_report = ingest_sources.camtrap_items(package, cls=cls)
        fields = {}  # every item carries its own site, camera and time
    elif detections is not None:
        try:
            items, source_report = ingest_sources.megadetector_items(
                Path(path), Path(detections), min_conf=min_conf, cls=cls,
                cls_map=ingest_sources.read_cls_map(cls_map) if cls_map else None)
        except (megadetector.MegaDetectorError, OSError, ValueError) as exc:
            raise IngestRefused([f"{detections}: {exc}"]) from None
    else:
        items = items_of(path, Limits(max_entry_bytes=max_image_bytes))
        if cls != "unknown":
            fields["cls"] = cls
    started = time.monotonic()
    results = await upload_all(api_url, items, fields, concurrency, progress, headers)
    upload_s = time.monotonic() - started
    ids = [d["id"] for r in results if "detections" in r for d in r["detections"]]
    report = {
        "images": len(results),
        "uploaded": sum(1 for r in results if "detections" in r),
        "duplicates": sum(1 for r in results if r.get("duplicate")),
        "rejected": [r for r in results if "error" in r],
        "submitted": len(ids),
        "upload_s": round(upload_s, 2),
    }
    if source_report:
        report["megadetector" if detections is not None else "camtrap_dp"] = source_report
    if wait:
        states = await wait_terminal(api_url, ids, timeout, progress, headers=headers)
        wall = time.monotonic() - started
        counts = Counter(states.get(i, "unknown") for i in ids)
        report.update({
            "terminal": sum(n for s, n in counts.items() if s in TERMINAL),
            "states": dict(sorted(counts.items())),
            "wall_s": round(wall, 2),
            "detections_per_s": round(len(ids) / wall, 2) if wall > 0 else None,
        })
    return report
