"""Sites and properties: which camera locations form one population (used by the API and the CLI).

A site moved to another property takes its future detections there; individuals already founded
stay where they are (moving a population is a human decision, not a configuration side effect), so
a site that has detections cannot change property.
"""
from __future__ import annotations

import re

import asyncpg

# The names of sites, cameras and properties: plain words, safe in paths, logs and URLs.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME = re.compile(NAME_PATTERN)


class SiteError(ValueError):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


async def list_sites(db: asyncpg.Pool | asyncpg.Connection) -> list[dict]:
    rows = await db.fetch(
        """SELECT s.name, s.property, s.lat, s.lon,
                  (SELECT count(*) FROM detections d WHERE d.site = s.name) AS detections
           FROM sites s ORDER BY s.property, s.name""")
    return [dict(r) for r in rows]


async def put_site(db: asyncpg.Pool, name: str, prop: str, lat: float | None, lon: float | None) -> dict:
    for label, value in (("site", name), ("property", prop)):
        if not NAME.match(value):
            raise SiteError(f"{label} {value!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if (lat is None) != (lon is None):
        raise SiteError("give both --lat and --lon, or neither")
    async with db.acquire() as conn, conn.transaction():
        current = await conn.fetchval("SELECT property FROM sites WHERE name = $1 FOR UPDATE", name)
        if current is not None and current != prop and await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM detections WHERE site = $1)", name):
            raise SiteError(f"site {name!r} has detections in property {current!r}; it cannot move to {prop!r}",
                            status=409)
        await conn.execute("INSERT INTO properties (name) VALUES ($1) ON CONFLICT DO NOTHING", prop)
        # Coordinates left out keep the stored ones: moving a site to another property, or naming it again,
        # must not erase where it is (and with it the travel-speed checks that need it).
        row = await conn.fetchrow(
            """INSERT INTO sites (name, property, lat, lon) VALUES ($1, $2, $3, $4)
               ON CONFLICT (name) DO UPDATE SET property = $2, lat = COALESCE($3, sites.lat),
                                                lon = COALESCE($4, sites.lon)
               RETURNING lat, lon""", name, prop, lat, lon)
    return {"name": name, "property": prop, "lat": row["lat"], "lon": row["lon"]}
