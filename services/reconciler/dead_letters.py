"""Dead letters fail their detections: a service gave up on an event, and says why."""
from __future__ import annotations

import logging
import uuid
from typing import Iterable, Sequence

import asyncpg

from shared.broker import Handled
from shared.schemas import DeadLetter
from shared.states import PENDING
from shared.topics import DEAD_LETTERS

log = logging.getLogger(__name__)


async def fail_pending(db: asyncpg.Pool | asyncpg.Connection, reasons: Iterable[tuple[uuid.UUID, str]]) -> None:
    """Mark each (detection, reason) failed with its reason, unless the detection is terminal already
    (a decision, or an earlier failure, stands)."""
    await db.executemany(
        """UPDATE detections SET state = 'failed', state_reason = $2, updated_at = now()
           WHERE id = $1 AND state = ANY($3::text[])""",
        [(detection, reason, sorted(PENDING)) for detection, reason in reasons])


class DeadLetterRecorder:
    """Marks the detection of every dead letter failed, with the reason. A broker runner's handler."""

    name = "dead-letters"
    input_topics = DEAD_LETTERS
    input_schema = DeadLetter
    dead_letters = False

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def handle(self, letters: Sequence[DeadLetter]) -> list[Handled]:
        marks = [(l.detection_id, f"{l.service}: {l.reason}") for l in letters
                 if l.detection_id is not None and l.fails_detection]
        if marks:
            await fail_pending(self.pool, marks)
        for letter in letters:
            log.warning("dead letter from %s (%s): %s", letter.service, letter.detection_id, letter.reason)
        return [Handled() for _ in letters]
