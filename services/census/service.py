"""The census loop: each step does the requested runs, then re-clusters every property that is due.

A property is due after `census_after_decisions` new decisions and answers (fusion's, people's; the census
job's own moves do not count), or `census_every_s` after its last run when anything changed at all, unless
its `census_auto` is off (`PUT /v1/census/{property}`). Runs
are requested by the API (`POST /v1/census/{property}/recluster`, `deer-reid census recluster`) and wait in
`census_runs` (the database is the queue: a request survives a restart of this service). One replica is
enough, and more are safe: a property's run holds a session lock, so two never re-cluster it at once.
"""
from __future__ import annotations

import logging
import time

import asyncpg

from services.census.job import RunTaken, recluster, request_run
from shared.config import Settings
from shared.db import create_pool
from shared.observability import CENSUS_MOVES, CENSUS_QUESTIONS, CENSUS_RUNS, STAGE_SECONDS

log = logging.getLogger(__name__)

DUE_SQL = """
WITH last AS (SELECT DISTINCT ON (property) property, decisions_seen, answers_seen, finished_at
              FROM census_runs WHERE state = 'done' ORDER BY property, id DESC),
     floor AS (SELECT coalesce(min(coalesce(l.decisions_seen, 0)), 0) AS seen
               FROM properties p LEFT JOIN last l ON l.property = p.name),
     decided AS (SELECT d.property, x.id FROM decisions x JOIN detections d ON d.id = x.detection_id
                 WHERE x.id > (SELECT seen FROM floor) AND x.decided_by <> 'recluster'),
     fresh AS (SELECT p.name AS property,
                      (SELECT count(*) FROM decided WHERE decided.property = p.name
                          AND decided.id > coalesce(l.decisions_seen, 0))
                    + (SELECT count(*) FROM identity_answers a WHERE a.property = p.name
                          AND a.id > coalesce(l.answers_seen, 0)) AS changes,
                      coalesce(l.finished_at, p.created_at) AS since
               FROM properties p LEFT JOIN last l ON l.property = p.name WHERE p.census_auto)
SELECT property, changes FROM fresh
WHERE (changes >= $1 OR (changes > 0 AND since < now() - make_interval(secs => $2)))
  -- a property whose run just failed waits a minute before the next try (the error is in its run's row)
  AND NOT EXISTS (SELECT 1 FROM census_runs f WHERE f.property = fresh.property AND f.state = 'failed'
                  AND f.finished_at > now() - interval '60 seconds')
ORDER BY property
"""


class CensusWorker:
    def __init__(self, pool: asyncpg.Pool, settings: Settings):
        self.pool, self.settings = pool, settings
        self.every_s = settings.census_poll_s
        self.last: dict | None = None

    def health(self) -> dict:
        return {"last_run": self.last}

    async def close(self) -> None:
        await self.pool.close()

    async def step(self) -> None:
        async with self.pool.acquire() as conn:
            due = await conn.fetch(DUE_SQL, self.settings.census_after_decisions, self.settings.census_every_s)
            for row in due:
                await request_run(conn, row["property"], f"schedule: {row['changes']} changes")
            pending = await conn.fetch("SELECT DISTINCT property FROM census_runs "
                                       "WHERE state IN ('requested', 'running') ORDER BY property")
            todo = []
            for row in pending:  # a run left running by a process that died is abandoned and requested anew
                run_id = await request_run(conn, row["property"], "schedule: after a dead run")
                if await conn.fetchval("SELECT state FROM census_runs WHERE id = $1", run_id) == "requested":
                    todo.append((row["property"], run_id))
        for prop, run_id in todo:
            await self.run(prop, run_id)

    async def run(self, prop: str, run_id: int) -> None:
        started = time.perf_counter()
        try:
            with STAGE_SECONDS.labels("census", "recluster").time():
                summary = await recluster(self.pool, prop, self.settings, run_id)
        except RunTaken as exc:
            log.info("%s", exc)
            return
        except Exception:
            CENSUS_RUNS.labels("failed").inc()
            raise
        CENSUS_RUNS.labels("done").inc()
        CENSUS_MOVES.inc(summary["moved"])
        CENSUS_QUESTIONS.labels(prop).set(summary["questions"])
        self.last = {"property": prop, "run_id": run_id, "seconds": round(time.perf_counter() - started, 2),
                     "moved": summary["moved"], "individuals": summary["individuals_after"]}
        log.info("census run %s of %s: %s", run_id, prop, self.last)


async def make_worker(settings: Settings) -> CensusWorker:
    return CensusWorker(await create_pool(settings.database_url, command_timeout=settings.census_statement_timeout_s),
                        settings)
