"""Fusion's join on the real database: a selective pose request that was lost between the commit that
expects it and its produce is sent again at the join deadline, once, instead of the detection being
decided without it."""
from __future__ import annotations

import hashlib
import os
import uuid
from datetime import datetime, timezone

import asyncpg

from shared.config import Settings
from shared.db import _init_connection, create_pool
from shared.schemas import DetectionEvent, JoinDeadline
from shared.topics import POSE_REQUESTS
from tests.conftest import make_jpeg


async def waiting_for_a_lost_pose_request(dsn: str) -> uuid.UUID:
    """A detection whose body joined, that fusion then asked pose about (committed), and whose request
    never reached the broker; its join deadline has passed."""
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    try:
        crop = make_jpeg(96, 64)
        sha = hashlib.sha256(crop + os.urandom(8)).hexdigest()
        det = uuid.uuid4()
        now = datetime.now(timezone.utc)
        async with conn.transaction():
            await conn.execute(
                """INSERT INTO images (sha256, byte_size, width, height, format, original_name, site, camera,
                                       captured_at, time_source) VALUES ($1,$2,96,64,'JPEG','p.jpg','pose-lost','c',
                                       $3,'request')""", sha, len(crop), now)
            await conn.execute(
                """INSERT INTO detections (id, image_sha256, ordinal, box, cls, site, camera, captured_at, crop,
                                           property, state, expected, join_deadline)
                   VALUES ($1,$2,0,'{0,0,96,64}','doe','pose-lost','c',$3,$4,'default','fusing',
                           ARRAY['body','pose'], now() - interval '1 second')""", det, sha, now, crop)
            await conn.execute("INSERT INTO detection_features (detection_id, component, status, features) "
                               "VALUES ($1, 'body', 'ok', '{}')", det)
    finally:
        await conn.close()
    return det


async def test_a_lost_pose_request_is_sent_again_at_the_join_deadline(pg_dsn, tmp_path):
    from services.fusion.service import FusionHandler

    det = await waiting_for_a_lost_pose_request(pg_dsn)
    handler = FusionHandler(await create_pool(pg_dsn, max_size=2), Settings(home=tmp_path, database_url=pg_dsn))
    try:
        [answer] = await handler.handle([JoinDeadline(detection_id=det)])
        assert answer.error is None and [o.topic for o in answer.outputs] == [POSE_REQUESTS]
        request = DetectionEvent.from_bytes(answer.outputs[0].value)
        assert request.detection_id == det and request.expected == ["body", "pose"]
        row = await handler.pool.fetchrow("SELECT state, requests_resent, join_deadline > now() AS later "
                                          "FROM detections WHERE id = $1", det)
        assert tuple(row) == ("fusing", 1, True)  # still joining, with a fresh deadline for the answer
    finally:
        await handler.close()
