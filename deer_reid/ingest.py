"""`deer-reid ingest`: upload images to the running API, and optionally wait for every result."""
from __future__ import annotations

import asyncio
import mimetypes
import time
from collections import Counter
from pathlib import Path

import httpx
from tqdm import tqdm

from shared.states import TERMINAL

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def find_images(path: Path) -> list[Path]:
    """The image files under `path` (recursively), or `path` itself, in a stable order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


async def upload_one(client: httpx.AsyncClient, path: Path, fields: dict[str, str], retries: int = 5) -> dict:
    """POST one image; returns the API's answer for it, or {"error", "status"}; retries only server trouble."""
    data = path.read_bytes()
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    for attempt in range(retries + 1):
        try:
            resp = await client.post("/v1/uploads", data=fields, files=[("files", (path.name, data, mime))])
        except httpx.TransportError as exc:
            if attempt == retries:
                return {"path": str(path), "status": None, "error": f"transport: {exc!r}"}
        else:
            if resp.status_code < 500:
                body = resp.json()
                if resp.status_code >= 400:
                    return {"path": str(path), "status": resp.status_code, "error": body.get("error", body)}
                return {"path": str(path), "status": resp.status_code, **body["images"][0]}
            if attempt == retries:
                return {"path": str(path), "status": resp.status_code, "error": resp.text[:500]}
        await asyncio.sleep(min(0.5 * 2 ** attempt, 8))
    raise AssertionError("unreachable")


async def upload_all(api_url: str, paths: list[Path], fields: dict[str, str], concurrency: int = 4,
                     progress: bool = True, headers: dict[str, str] | None = None) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(paths), desc="upload", unit="img", disable=not progress)

    async with httpx.AsyncClient(base_url=api_url, timeout=120, headers=headers) as client:
        async def one(path: Path) -> dict:
            async with sem:
                result = await upload_one(client, path, fields)
            bar.update(1)
            return result

        results = await asyncio.gather(*(one(p) for p in paths))
    bar.close()
    return results


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


async def ingest(api_url: str, path: Path, *, site: str | None, fallback_site: str | None = None, camera: str | None, captured_at: str | None,
                 wait: bool, timeout: float | None = None, concurrency: int = 4, progress: bool = True,
                 headers: dict[str, str] | None = None) -> dict:
    paths = find_images(path)
    fields = {k: v for k, v in (("site", site), ("fallback_site", fallback_site), ("camera", camera),
                                ("fallback_captured_at", captured_at)) if v}
    started = time.monotonic()
    results = await upload_all(api_url, paths, fields, concurrency, progress, headers)
    upload_s = time.monotonic() - started
    ids = [d["id"] for r in results if "detections" in r for d in r["detections"]]
    report = {
        "images": len(paths),
        "uploaded": sum(1 for r in results if "detections" in r),
        "duplicates": sum(1 for r in results if r.get("duplicate")),
        "rejected": [r for r in results if "error" in r],
        "submitted": len(ids),
        "upload_s": round(upload_s, 2),
    }
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
