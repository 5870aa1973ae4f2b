"""What a command runs with: the settings its arguments make, and where the database and the API are."""
from __future__ import annotations

import argparse

from deer_reid.client import api_url, call_api
from shared.config import Settings


def settings_for(args: argparse.Namespace) -> Settings:
    """The environment's settings (DEER_*), overridden by the options the command was given."""
    overrides = {}
    if getattr(args, "home", None):
        overrides["home"] = args.home
    if getattr(args, "body_model", None) and args.command == "up":
        overrides["body_model"] = args.body_model
    if getattr(args, "body_ensemble", None):
        overrides["body_ensemble"] = args.body_ensemble
    if getattr(args, "allow_random_weights", False):
        overrides["allow_random_weights"] = True
    if getattr(args, "api_port", None):
        overrides["api_port"] = args.api_port
    if getattr(args, "precision", None):
        overrides["precision"] = args.precision
    return Settings(**overrides)


def database_url_for(settings: Settings) -> str:
    from deer_reid.stack import read_state

    if settings.database_url:
        return settings.database_url
    state = read_state(settings.home)
    if not state:
        raise SystemExit("deer-reid: no running stack found (deer-reid up) and DEER_DATABASE_URL is not set")
    return state["database_url"]


def api(args: argparse.Namespace, method: str, path: str, **kw):
    """A call to the API the arguments point at (--api-url, else as `client.api_url` finds it)."""
    settings = settings_for(args)
    return call_api(settings, api_url(settings, args.api_url), method, path, **kw)
