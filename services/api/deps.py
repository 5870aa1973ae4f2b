"""The API's shared dependencies: the database pool and the settings."""
from __future__ import annotations

from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from shared.config import Settings, get_settings


def get_pool(request: Request) -> asyncpg.Pool:
    return request.app.state.pool


Pool = Annotated[asyncpg.Pool, Depends(get_pool)]
Config = Annotated[Settings, Depends(get_settings)]
