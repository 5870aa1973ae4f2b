"""Fusion's view of the calibration artifacts (`shared.calibration_artifact`): the active ones, re-read
from the database when a newer one is installed, and the thresholds and fitted fusion they give."""
from __future__ import annotations

import logging

import asyncpg

from services.fusion import store
from services.fusion.decision import Thresholds
from shared.calibrated import FusionModel
from shared.calibration_artifact import ArtifactError, check_artifact

log = logging.getLogger(__name__)


class CalibrationSource:
    """The active artifacts, re-read whenever a newer one is installed: no restart to pick up a new fit.

    The global one (`deer-reid eval`, `calibration install`) applies everywhere; a property's own (fitted by the
    census job on its people's answers) applies to that property's detections before the global one."""

    def __init__(self, default: Thresholds):
        self.default = default
        self.id: int | None = None
        self.artifact: dict | None = None
        self.model: FusionModel | None = None
        self.by_property: dict[str, tuple[int, dict, FusionModel]] = {}

    async def refresh(self, conn: asyncpg.Connection) -> None:
        active_id, artifact = await store.active_calibration(conn, self.id)
        if active_id is None:
            self.id, self.artifact, self.model = None, None, None
        elif artifact is not None:
            self.id, self.artifact, self.model = active_id, *self._load(active_id, artifact)
        known = {prop: cal_id for prop, (cal_id, _, _) in self.by_property.items()}
        fresh = {}
        for prop, cal_id, artifact in await store.property_calibrations(conn, known):
            if artifact is None:
                fresh[prop] = self.by_property[prop]
                continue
            loaded, model = self._load(cal_id, artifact)
            if loaded is not None:
                fresh[prop] = (cal_id, loaded, model)
        self.by_property = fresh

    @staticmethod
    def _load(cal_id: int, artifact: dict) -> tuple[dict | None, FusionModel | None]:
        try:
            checked = check_artifact(artifact)
            model = FusionModel.from_artifact({**checked, "version_id": cal_id})
        except ArtifactError as exc:
            log.error("calibration %s ignored: %s", cal_id, exc)
            return None, None
        log.info("calibration %s loaded: thresholds %s", cal_id, checked["thresholds"])
        return checked, model

    def for_versions(self, versions: dict[str, str], prop: str | None = None) -> tuple[Thresholds, FusionModel | None]:
        """The thresholds and fitted fusion for body embeddings of these versions, in this property (its own
        calibration first, then the global one; the defaults if none applies)."""
        own = self.by_property.get(prop) if prop is not None else None
        for artifact, model in ((own[1], own[2]) if own else (None, None), (self.artifact, self.model)):
            if artifact and artifact.get("embedding_versions") == versions:
                t = artifact["thresholds"]
                return Thresholds(match=t["match"], new=t["new"]), model
        return self.default, None
