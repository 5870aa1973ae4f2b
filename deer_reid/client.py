"""How the command line finds the API and authenticates to it."""
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
