"""The calibration artifact the evaluation writes and fusion reads: thresholds and P(same individual).

An artifact is only used for the embedding versions it was fitted on: thresholds
of one model say nothing about another's scores.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from services.fusion.decision import Thresholds

log = logging.getLogger(__name__)
ARTIFACT_KIND = "deer-reid-calibration"


def load_artifact(path: Path) -> dict | None:
    try:
        artifact = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("calibration artifact %s unreadable: %s", path, exc)
        return None
    if artifact.get("kind") != ARTIFACT_KIND or "thresholds" not in artifact:
        log.error("calibration artifact %s is not a %s file", path, ARTIFACT_KIND)
        return None
    return artifact


def p_same(artifact: dict, score: float) -> float:
    """Calibrated probability that a candidate with this score is the same individual."""
    iso = artifact["isotonic"]
    return float(np.interp(score, iso["x"], iso["y"]))


class CalibrationSource:
    """Reads the artifact at `path`, again whenever the file changes: no restart to pick up a new fit."""

    def __init__(self, path: Path, default: Thresholds):
        self.path = Path(path)
        self.default = default
        self._mtime: float | None = None
        self.artifact: dict | None = None

    def refresh(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            self._mtime, self.artifact = None, None
            return
        if mtime != self._mtime:
            self._mtime = mtime
            self.artifact = load_artifact(self.path)
            if self.artifact:
                log.info("calibration loaded from %s: %s", self.path, self.artifact["thresholds"])

    def for_versions(self, versions: dict[str, str]) -> tuple[Thresholds, dict | None]:
        """The thresholds for embeddings of these versions, and the artifact if it applies."""
        a = self.artifact
        if a and a.get("embedding_versions") == versions:
            t = a["thresholds"]
            return Thresholds(match=t["match"], new=t["new"]), a
        return self.default, None
