"""The join: each component's features for a detection, recorded as rows of `detection_features` until the
detection is due for a decision. It is due when every component it expects has arrived (or failed), or when
its join deadline has passed and the anchoring body features are in. Features arriving after the decision are
stored and reopen nothing. A restart or a rebalance mid-join loses nothing: the join is rows.

Pose is expected only when asked for (an uncertain body-only match): asking reopens the join with a fresh
deadline, and a request that got no answer by it is sent again POSE_RESENDS times."""
from __future__ import annotations

import asyncpg

from services.fusion import store
from services.fusion.result import result_output
from services.fusion.store import expected_of
from services.fusion.validation import Refused, validate
from shared.broker import Handled, Output
from shared.pipeline import detection_event
from shared.schemas import Features, JoinDeadline, PipelineConfig
from shared.states import FAILED, is_terminal
from shared.topics import POSE_REQUESTS

POSE_RESENDS = 1  # a pose request with no answer by its deadline is sent again this many times


class Join:
    """Records feature events and join deadlines; `join_timeout_s` is how long a detection waits for its
    components once its body features are in (and for a pose answer once asked)."""

    def __init__(self, join_timeout_s: float):
        self.join_timeout_s = join_timeout_s
        self._dim_of_version: dict[str, int] = {}

    async def record(self, conn: asyncpg.Connection,
                     event: Features | JoinDeadline) -> tuple[Handled, asyncpg.Record | None]:
        """Record the event in the join; the detection's row when it is now due for a decision."""
        det = await store.lock_detection(conn, event.detection_id)
        if det is None:
            return Handled(error=f"unknown detection {event.detection_id}"), None
        if isinstance(event, JoinDeadline):
            if is_terminal(det["state"]):
                return Handled(), None
            arrived = await store.arrived(conn, det["id"])
            if arrived.get("body") != "ok":
                return Handled(), None
            if "pose" in expected_of(det) and "pose" not in arrived and det["requests_resent"] < POSE_RESENDS:
                # The pose request leaves after the transaction that expects it commits: a crash (or a failed
                # later property) between the two lost it. Sent again once, with a fresh deadline.
                await store.expect_again(conn, det["id"], self.join_timeout_s)
                return Handled([await pose_request(conn, det, PipelineConfig(**(det["pipeline"] or {})))]), None
            # Due with what arrived, as long as the anchoring body did (the shortlist comes from it).
            return Handled(), det
        dims = {e.version: await self._known_dim(conn, e.version) for e in event.embeddings}
        try:
            coat_patterns = validate(event, det, dims)
        except Refused as exc:
            if not is_terminal(det["state"]) and event.component in expected_of(det) \
                    and event.property == det["property"]:
                # The component failed on bad input: missing for the join, never a blocker.
                await store.add_feature(conn, det["id"], event.component, "failed", {"reason": str(exc)})
                if event.component == "body":
                    await store.fail(conn, det["id"], f"fusion: body features refused: {exc}")
                    return Handled(error=str(exc)), None
                return Handled(error=str(exc)), await due_if_complete(conn, det)
            return Handled(error=str(exc)), None
        if is_terminal(det["state"]):
            # Late or redelivered: stored, never reopens the decision; a body redelivery re-publishes the result.
            await store.add_feature(conn, det["id"], event.component, event.status, stored_features(event),
                                    late=True)
            if event.component == "body" and det["state"] != FAILED and det["result"] is not None:
                return Handled([result_output(det["property"], det["result"])]), None
            return Handled(), None
        await store.add_feature(conn, det["id"], event.component, event.status, stored_features(event))
        if coat_patterns:
            await store.store_coat_patterns(conn, det["id"], coat_patterns)
        if event.component == "antler" and event.attributes.get("present") is not None:
            fp = event.embeddings[0] if event.embeddings else None
            await store.store_antler(conn, det["id"], event.attributes, None if fp is None else fp.array(),
                                     None if fp is None else fp.version, det["captured_at"])
        if event.component == "body":
            await store.store_embeddings(conn, det["id"], det["site"], det["property"], event.embeddings)
            await store.start_fusing(conn, det["id"], self.join_timeout_s)
        else:
            await store.start_fusing(conn, det["id"], None)
        return Handled(), await due_if_complete(conn, det)

    async def ask_for_pose(self, conn: asyncpg.Connection, det: asyncpg.Record, config: PipelineConfig) -> Output:
        """Reopen the join of an undecided detection to wait for pose, with a fresh deadline; the request."""
        await store.expect_more(conn, det["id"], "pose", self.join_timeout_s)
        return await pose_request(conn, det, config)

    async def _known_dim(self, conn: asyncpg.Connection, version: str) -> int | None:
        """The dimension vectors of `version` have (a version's dimension never changes: cached)."""
        if version not in self._dim_of_version:
            dim = await store.known_dim(conn, version)
            if dim is None:
                return None
            self._dim_of_version[version] = dim
        return self._dim_of_version[version]


async def due_if_complete(conn: asyncpg.Connection, det: asyncpg.Record) -> asyncpg.Record | None:
    """The row when every expected component is in (body among them, as evidence), else None."""
    arrived = await store.arrived(conn, det["id"])
    return det if arrived.get("body") == "ok" and all(c in arrived for c in expected_of(det)) else None


def stored_features(event: Features) -> dict:
    """What the join keeps of a component's features (body vectors live in `embeddings`, coat patterns in
    `coat_patterns`, as bytes)."""
    stored = event.model_dump(mode="json", exclude={"embeddings"} if event.component == "body" else set())
    if event.component == "coat" and isinstance(stored.get("attributes"), dict):
        stored["attributes"].pop("patterns", None)
    return stored


async def pose_request(conn: asyncpg.Connection, det: asyncpg.Record, config: PipelineConfig) -> Output:
    """The detection's event to the pose service, its crop with it, expecting pose as well."""
    event = detection_event(det, config, list(dict.fromkeys(expected_of(det) + ["pose"])),
                            await store.crop_of(conn, det["id"]))
    return Output(POSE_REQUESTS, str(det["id"]).encode(), event.to_bytes())
