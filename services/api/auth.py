"""API keys: who may change state, and who did.

A key is `deer_<prefix>_<secret>`; the database keeps only its prefix (to find the row) and the
SHA-256 of the whole token. Scopes nest: `read` < `review` < `admin`.

- Every request that changes state needs a key of enough scope: uploads and decisions `review`,
  configuration, sites, calibrations `admin`.
- Reads are open when the API listens on a loopback address only (the embedded default: whoever can
  reach it is on this machine); bound to any other address, reads need a key too.
- The page signs in once and then sends the key in an HttpOnly, SameSite=Strict cookie; a
  state-changing request that authenticates by cookie must also carry `X-Deer-Page: 1`, which a
  cross-site form cannot add.

The audit log records the key's owner, never a header the caller chose.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import asyncpg
from fastapi import Depends, HTTPException, Request

from shared.config import Settings, get_settings

SCOPES = ("read", "review", "admin")
COOKIE = "deer_key"
PAGE_HEADER = "x-deer-page"
LOCAL_KEY_FILE = "admin.key"


@dataclass(frozen=True)
class Principal:
    owner: str
    scope: str
    key_id: int | None  # None: an anonymous reader on a loopback-only API

    def may(self, scope: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)


ANONYMOUS_READER = Principal("anonymous", "read", None)


def new_token() -> tuple[str, str, bytes]:
    """(token, prefix, hash) of a fresh key."""
    prefix = secrets.token_hex(4)
    token = f"deer_{prefix}_{secrets.token_urlsafe(32)}"
    return token, prefix, hash_token(token)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def prefix_of(token: str) -> str | None:
    parts = token.split("_")
    if len(parts) < 3 or parts[0] != "deer" or len(parts[1]) != 8 or len(token) > 200:
        return None
    return parts[1]


async def create_key(conn: asyncpg.Connection | asyncpg.Pool, owner: str, scope: str) -> tuple[int, str]:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    owner = owner.strip()
    if not 1 <= len(owner) <= 100:
        raise ValueError("owner must be 1-100 characters")
    token, prefix, digest = new_token()
    key_id = await conn.fetchval("INSERT INTO api_keys (prefix, hash, owner, scope) VALUES ($1, $2, $3, $4) "
                                 "RETURNING id", prefix, digest, owner, scope)
    return key_id, token


async def list_keys(conn) -> list[dict]:
    rows = await conn.fetch("SELECT id, prefix, owner, scope, created_at, last_used_at, revoked_at FROM api_keys "
                            "ORDER BY id")
    return [dict(r) for r in rows]


async def revoke_key(conn, key_id: int) -> bool:
    return bool(await conn.fetchval(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING true", key_id))


async def principal_of(pool: asyncpg.Pool, token: str) -> Principal | None:
    prefix = prefix_of(token)
    if prefix is None:
        return None
    row = await pool.fetchrow("SELECT id, hash, owner, scope, revoked_at FROM api_keys WHERE prefix = $1", prefix)
    if row is None or row["revoked_at"] is not None or not hmac.compare_digest(bytes(row["hash"]), hash_token(token)):
        return None
    await pool.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1 AND "
                       "(last_used_at IS NULL OR last_used_at < now() - interval '1 minute')", row["id"])
    return Principal(row["owner"], row["scope"], row["id"])


def loopback_only(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _presented(request: Request) -> tuple[str | None, bool]:
    """(token, came by cookie)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip(), False
    if request.headers.get("x-api-key"):
        return request.headers["x-api-key"].strip(), False
    if request.cookies.get(COOKIE):
        return request.cookies[COOKIE], True
    return None, False


def requires(scope: str):
    """A dependency: the caller's principal, refused with 401 (no or bad key) or 403 (too small a scope)."""

    async def check(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> Principal:
        token, by_cookie = _presented(request)
        if token is None:
            if scope == "read" and loopback_only(settings.api_host):
                return ANONYMOUS_READER
            raise HTTPException(401, detail={"error": f"an API key with scope '{scope}' is needed "
                                                      "(Authorization: Bearer <key>)"},
                                headers={"WWW-Authenticate": "Bearer"})
        principal = await principal_of(request.app.state.pool, token)
        if principal is None:
            raise HTTPException(401, detail={"error": "unknown or revoked API key"},
                                headers={"WWW-Authenticate": "Bearer"})
        if not principal.may(scope):
            raise HTTPException(403, detail={"error": f"this key's scope is '{principal.scope}'; "
                                                      f"'{scope}' is needed"})
        if by_cookie and scope != "read" and request.headers.get(PAGE_HEADER) != "1":
            raise HTTPException(403, detail={"error": f"a signed-in page request must carry {PAGE_HEADER}: 1"})
        return principal

    return check


Reader = Annotated[Principal, Depends(requires("read"))]
Reviewer = Annotated[Principal, Depends(requires("review"))]
Admin = Annotated[Principal, Depends(requires("admin"))]


def write_local_key(home: Path, token: str) -> Path:
    """The embedded default's admin key, readable by its owner only (the CLI and the page use it)."""
    path = home / LOCAL_KEY_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return path


def read_local_key(home: Path) -> str | None:
    path = home / LOCAL_KEY_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


async def ensure_local_key(pool_or_conn, home: Path) -> str:
    """The local admin key of `home`: the one on disk while the database still knows it, else a new one."""
    token = read_local_key(home)
    if token:
        prefix = prefix_of(token)
        row = await pool_or_conn.fetchrow("SELECT hash, revoked_at FROM api_keys WHERE prefix = $1", prefix)
        if row is not None and row["revoked_at"] is None and hmac.compare_digest(bytes(row["hash"]), hash_token(token)):
            return token
    _, token = await create_key(pool_or_conn, "local-admin", "admin")
    write_local_key(home, token)
    return token
