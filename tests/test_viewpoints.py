"""The viewpoint rule is written once (shared/viewpoints.py) and read twice: in Python for a result in hand,
in SQL over stored rows. Both are run here on the same results, the SQL on the real PostgreSQL."""
from __future__ import annotations

import asyncio
import json

import asyncpg

from shared.viewpoints import FRONTAL, LEFT, REAR, RIGHT, UNKNOWN, VIEWPOINT_SQL, known, viewpoint_of

RESULTS = [
    None,
    {},
    {"pose": {"viewpoint": RIGHT}, "coat": {"facing": "left"}},  # pose knew: pose wins
    {"pose": {"viewpoint": UNKNOWN}, "coat": {"facing": "left"}},  # pose did not know: the coat's facing
    {"pose": {"viewpoint": ""}, "coat": {"facing": "right"}},
    {"pose": {"viewpoint": None}, "coat": {"facing": "right"}},
    {"pose": None, "coat": {"facing": "left"}},
    {"pose": {"viewpoint": FRONTAL}},
    {"pose": {"viewpoint": REAR}, "coat": None},
    {"coat": {"facing": "front"}},  # a facing that is no profile: not known
    {"coat": {"facing": None}},
    {"pose": {"viewpoint": UNKNOWN}},
]


def test_python_and_sql_give_every_stored_result_the_same_viewpoint(pg_dsn):
    async def in_sql() -> list[str | None]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return [await conn.fetchval(f"SELECT {VIEWPOINT_SQL} FROM (SELECT $1::jsonb AS result) d",
                                        None if r is None else json.dumps(r)) for r in RESULTS]
        finally:
            await conn.close()

    expected = [None, None, RIGHT, LEFT, RIGHT, RIGHT, LEFT, FRONTAL, REAR, None, None, None]
    assert [viewpoint_of(r) for r in RESULTS] == expected
    assert asyncio.run(in_sql()) == expected


def test_only_a_real_label_is_known():
    assert known(LEFT) and known(FRONTAL)
    assert not known(UNKNOWN) and not known(None) and not known("")
