"""Database access: the asyncpg pool (with pgvector types) and versioned SQL migrations."""
from __future__ import annotations

import logging
import re
from importlib import resources

import asyncpg
from pgvector.asyncpg import register_vector

log = logging.getLogger(__name__)

OUTBOX_CHANNEL = "deer_outbox"  # NOTIFY channel: a detection was enqueued for publishing
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_MIGRATION_LOCK = 0x6465_6572  # "deer": one migrator at a time across processes


async def _init_connection(conn: asyncpg.Connection) -> None:
    await register_vector(conn)
    await conn.set_type_codec("jsonb", encoder=_json_dumps, decoder=_json_loads, schema="pg_catalog")


def _json_dumps(value) -> str:
    import json

    return json.dumps(value, separators=(",", ":"), default=str)


def _json_loads(text: str):
    import json

    return json.loads(text)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 8,
                      command_timeout: float = 60) -> asyncpg.Pool:
    """A pool whose connections know the vector/halfvec and jsonb types; a statement that has not answered
    within `command_timeout` seconds is abandoned (the census job's bulk statements get longer)."""
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=_init_connection,
                                     command_timeout=command_timeout)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped in shared/migrations, in order."""
    found = []
    for entry in resources.files("shared.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not applied yet, each in its own transaction; returns their names."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            log.info("applied migration %s", name)
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        await conn.close()


def redact_dsn(url: str) -> str:
    """The database URL with its password replaced by ***: safe to print or write to a state file."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
