"""The viewpoint labels every part speaks, and the one rule that gives a stored detection its viewpoint.

The pose service writes the labels; fusion's pose component and exemplar choice compare them; the API and the
evaluation read them. A decided detection's viewpoint is pose's where pose ran and knew, else the coat
service's facing of a profile, else not known. The rule is written once here, as Python (`viewpoint_of`, for a
result in hand) and as SQL generated from the same table (`VIEWPOINT_SQL`, for rows in PostgreSQL), and
tests/test_viewpoints.py runs both on the same results.
"""
from __future__ import annotations

FRONTAL, LEFT, RIGHT, REAR, ANGLED, UNKNOWN = "frontal", "profile-left", "profile-right", "rear", "angled", "unknown"

FACING = {"left": LEFT, "right": RIGHT}  # the coat service's facing of a profile -> its viewpoint


def known(view: str | None) -> bool:
    return bool(view) and view != UNKNOWN


def viewpoint_of(result: dict | None) -> str | None:
    """A decided detection's viewpoint from its stored result (None: not known)."""
    result = result or {}
    pose = (result.get("pose") or {}).get("viewpoint")
    if known(pose):
        return str(pose)
    return FACING.get((result.get("coat") or {}).get("facing"))


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# The same rule over `detections d` in SQL (exemplar choice and the fusion search read it in their queries).
VIEWPOINT_SQL = (
    f"COALESCE(NULLIF(NULLIF(d.result->'pose'->>'viewpoint', {_sql_literal(UNKNOWN)}), ''), "
    "CASE d.result->'coat'->>'facing' "
    + " ".join(f"WHEN {_sql_literal(facing)} THEN {_sql_literal(view)}" for facing, view in FACING.items())
    + " END)")
