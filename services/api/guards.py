"""What stands between the API and a hostile or careless client, before any route runs.

- `RateLimit`: a token bucket per client address. A client may burst (`burst` requests), then holds to
  `per_s`; over that it is answered 429 with Retry-After. Health and metrics are never limited (probes
  and Prometheus must see an overloaded API). At most `max_clients` buckets are kept; the least recently
  seen go first, so a flood of addresses costs bounded memory.
- `OriginPolicy`: a state-changing request (POST, PUT, PATCH, DELETE) that a browser sends from another
  origin (its Origin header, or for an opaque "null" origin its Sec-Fetch-Site) is refused 403, whatever
  it carries; origins listed in DEER_CORS_ORIGINS are allowed and get
  CORS headers (Starlette's CORSMiddleware, in front). The page's cookie is SameSite=Strict and needs a
  custom header already; this refuses the request itself, with a reason, before it is parsed.
- `BodyDeadline`: the whole request body must arrive within `seconds` (a slow sender holds a worker and a
  spooled upload for as long as it likes otherwise): 408 past it.

Pure ASGI middleware: nothing buffers or re-reads the body.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from shared.observability import EVENTS

UNLIMITED_PATHS = frozenset({"/healthz", "/metrics"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class TokenBuckets:
    """Per-key token buckets (pure: the caller gives the clock)."""

    def __init__(self, per_s: float, burst: int, max_clients: int = 10_000):
        self.per_s, self.burst, self.max_clients = per_s, burst, max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str, now: float) -> float:
        """0 when the request may go on (a token is spent), else the seconds until a token is there."""
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.per_s
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


async def _answer(send, status: int, error: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": error}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def parse_networks(text: str) -> tuple:
    """`DEER_TRUSTED_PROXIES`: comma-separated addresses or networks (10.0.0.0/8, ::1)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def client_address(scope, trusted: tuple) -> str:
    """Who sent the request: the socket's peer, unless that peer is a proxy we trust (an ingress, a load
    balancer); then the nearest address in X-Forwarded-For that is not one of ours. Without trusted
    proxies the header is ignored: anyone can write it."""
    peer = (scope.get("client") or ("unknown", 0))[0]
    if not trusted or not _in(peer, trusted):
        return peer
    forwarded = _header(scope, b"x-forwarded-for") or ""
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if not _in(hop, trusted):
            return hop if _in(hop, None) else peer  # a hop that is not an address: the proxy itself counts
    return peer


def _in(address: str, networks: tuple | None) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return networks is None or any(ip in n for n in networks)


class RateLimit:
    def __init__(self, app, per_s: float, burst: int, clock=time.monotonic, trusted_proxies: tuple = ()):
        self.app, self.clock = app, clock
        self.buckets = TokenBuckets(per_s, burst)
        self.trusted = trusted_proxies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            return await self.app(scope, receive, send)
        client = client_address(scope, self.trusted)
        wait = self.buckets.take(client, self.clock())
        if wait > 0:
            EVENTS.labels("api", "rate-limited").inc()
            return await _answer(send, 429, f"too many requests from {client}: slow down",
                                 {"retry-after": str(max(1, math.ceil(wait)))})
        return await self.app(scope, receive, send)


def same_origin(origin: str, scope) -> bool:
    """Whether the browser's Origin names the host this request came to."""
    host = _header(scope, b"host")
    parts = urlsplit(origin)
    return host is not None and parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


class OriginPolicy:
    def __init__(self, app, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS and not self.permits(scope):
            origin = _header(scope, b"origin") or _header(scope, b"sec-fetch-site")
            EVENTS.labels("api", "cross-origin-refused").inc()
            return await _answer(send, 403, f"a state change from origin {str(origin)[:100]!r} is refused "
                                            "(allowed: this host and DEER_CORS_ORIGINS)")
        return await self.app(scope, receive, send)

    def permits(self, scope) -> bool:
        origin = _header(scope, b"origin")
        fetch_site = _header(scope, b"sec-fetch-site")  # set by the browser itself, never by a page
        if origin == "null":
            # an opaque origin: a sandboxed frame or a data: URL, or our own page, whose no-referrer policy
            # makes the browser send "null" for its form posts; only the browser's own word tells them apart
            return fetch_site == "same-origin"
        if origin is not None:
            return origin in self.allowed or same_origin(origin, scope)
        return fetch_site not in ("cross-site", "same-site")  # no Origin: a program, not a page


class _TooSlow(Exception):
    pass


class BodyDeadline:
    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.seconds
        state = {"body_done": False, "too_slow": False, "answered": False}

        async def timed_receive():
            if state["body_done"]:  # after the body: a disconnect is waited for as long as the app likes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                state["too_slow"] = True
                raise _TooSlow() from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def guarded_send(message):
            # the app may turn the failed read into an answer of its own (FastAPI: 400 "error parsing the
            # body"); the client is told the real reason instead
            if state["too_slow"]:
                if not state["answered"]:
                    state["answered"] = True
                    await self._too_slow(send)
                return
            state["answered"] = state["answered"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except _TooSlow:
            if not state["answered"]:
                state["answered"] = True
                await self._too_slow(send)

    async def _too_slow(self, send) -> None:
        EVENTS.labels("api", "body-too-slow").inc()
        await _answer(send, 408, f"the request body did not arrive within {self.seconds:g} s")
