"""How the command line finds the API, authenticates to it and calls it."""
from __future__ import annotations

import os

from services.api.auth import read_local_key
from shared.config import Settings


def api_key(settings: Settings) -> str | None:
    """DEER_API_KEY, else the embedded stack's local admin key (written by `deer-reid up`)."""
    return os.environ.get("DEER_API_KEY") or read_local_key(settings.home)


def auth_headers(settings: Settings) -> dict[str, str]:
    key = api_key(settings)
    return {"Authorization": f"Bearer {key}"} if key else {}


def api_url(settings: Settings, explicit: str | None = None) -> str:
    """The API's address: `explicit` (a command's --api-url), else DEER_API_URL, else the running embedded
    stack's, else the configured one."""
    from deer_reid.stack import read_state

    if explicit:
        return explicit
    if os.environ.get("DEER_API_URL"):
        return os.environ["DEER_API_URL"]
    state = read_state(settings.home)
    return state["api_url"] if state else settings.api_url


def call_api(settings: Settings, url: str, method: str, path: str, **kw):
    """One authenticated request to the API at `url`: its JSON, or its bytes when it answers something else.
    No answer, or an error answer, ends the command (SystemExit) with the API's own reason."""
    import httpx

    try:
        resp = httpx.request(method, url + path, timeout=60, headers=auth_headers(settings), **kw)
    except httpx.HTTPError as exc:
        raise SystemExit(f"deer-reid: the API at {url} did not answer ({exc}); is the stack up?") from None
    if resp.status_code >= 400:
        raise SystemExit(f"deer-reid: {method} {path}: {resp.status_code} {_error_text(resp)}")
    return resp.json() if resp.headers.get("content-type", "").startswith("application/json") else resp.content


def switch_pipeline(api_url: str, headers: dict, **switches) -> dict:
    """Set run-time switches of the running stack (PUT /v1/config); returns the values the switches set
    had before, for the caller to put back."""
    import httpx

    before = httpx.get(f"{api_url}/v1/config", timeout=30, headers=headers)
    before.raise_for_status()
    resp = httpx.put(f"{api_url}/v1/config", json=switches, headers=headers, timeout=30)
    resp.raise_for_status()
    return {k: before.json()[k] for k in switches}


def _error_text(resp) -> str:
    """The API's reason for an error answer: its `detail` (or the detail's `error`), else the body's start."""
    try:
        detail = resp.json().get("detail", resp.json())
        return detail.get("error", str(detail)) if isinstance(detail, dict) else str(detail)
    except ValueError:
        return resp.text[:500]
