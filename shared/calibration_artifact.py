"""The fusion calibration artifact: what `deer-reid eval` writes and `calibration install` (or the API)
stores, checked by value before it is stored; fusion loads the active one from the database.

It lives in PostgreSQL (table `calibrations`, newest active row) so that every fusion replica, in a
container or not, reads the same fit without sharing a disk. It holds per-component calibrations,
the combination weights and the thresholds, and applies only to detections whose body embeddings
have exactly the versions it was fitted on: scores of one model say nothing about another's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import asyncpg

from shared.calibrated import FusionModel

ARTIFACT_KIND = "deer-reid-calibration"
ARTIFACT_VERSION = 2  # 2: per-component calibrations and fitted fusion weights
# Components renamed since artifacts were first written: XFeat's pattern was `coat:pattern` until RootSIFT's
# joined it. Migration 0015 renamed the stored artifacts and graph edges; a file fitted before is read here
# with the new names (tests/test_components.py checks each new name is a registered component).
FORMER_NAMES = {"coat:pattern": "coat:pattern-xfeat"}


class ArtifactError(ValueError):
    """Not a usable calibration artifact; the message says why."""


def check_artifact(artifact: dict) -> dict:
    """The artifact, with any former component names renamed, if it can decide; ArtifactError saying why not."""
    if not isinstance(artifact, dict) or artifact.get("kind") != ARTIFACT_KIND:
        raise ArtifactError(f"not a {ARTIFACT_KIND} artifact")
    artifact = _with_current_names(artifact)
    if artifact.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(f"artifact version {artifact.get('version')} is not {ARTIFACT_VERSION}: "
                            "fit it again with `deer-reid eval --protocol loo`")
    for key in ("thresholds", "embedding_versions", "fusion"):
        if key not in artifact:
            raise ArtifactError(f"artifact has no {key!r}")
    # Values, not only keys: an artifact accepted here is used for every decision of its embedding
    # versions, and one that raises or decides nonsense there would stall or corrupt all of them.
    t = artifact["thresholds"]
    if not isinstance(t, dict) or not all(_number(t.get(k)) and 0.0 <= t[k] <= 1.0 for k in ("match", "new")):
        raise ArtifactError(f"thresholds {t!r} must give match and new, each a number in [0, 1]")
    if t["new"] > t["match"]:
        raise ArtifactError(f"threshold new {t['new']} is above match {t['match']}: nothing could go to review "
                            "and the decision would be undefined between them")
    versions = artifact["embedding_versions"]
    if not isinstance(versions, dict) or not versions or not all(isinstance(k, str) and isinstance(v, str)
                                                                 for k, v in versions.items()):
        raise ArtifactError("embedding_versions must map each body model to its embedding version")
    try:
        model = FusionModel.from_artifact(artifact)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"the fusion section is malformed: {type(exc).__name__}: {exc}") from None
    for name, c in model.calibrations.items():
        if len(c.x) < 1 or len(c.x) != len(c.y) or not all(map(_number, c.x + c.y)):
            raise ArtifactError(f"calibration {name!r}: x and y must be equally long lists of numbers")
        if any(b < a for a, b in zip(c.x, c.x[1:])):
            raise ArtifactError(f"calibration {name!r}: its knots x are not sorted")
        if not all(0.0 <= v <= 1.0 for v in c.y) or not 0.0 < c.prior < 1.0:
            raise ArtifactError(f"calibration {name!r}: probabilities must lie in [0, 1] and its prior in (0, 1)")
    if not all(_number(w) for w in model.weights.values()) or not _number(model.intercept):
        raise ArtifactError("fusion weights and intercept must be finite numbers")
    if set(model.weights) - set(model.calibrations):
        raise ArtifactError(f"fusion weighs components it has no calibration for: "
                            f"{sorted(set(model.weights) - set(model.calibrations))}")
    return artifact


def _with_current_names(artifact: dict) -> dict:
    fusion = artifact.get("fusion")
    if not isinstance(fusion, dict):
        return artifact
    renamed = {key: {FORMER_NAMES.get(name, name): value for name, value in fusion[key].items()}
               for key in ("calibrations", "weights") if isinstance(fusion.get(key), dict)}
    return {**artifact, "fusion": {**fusion, **renamed}}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_file(path: Path) -> dict:
    try:
        return check_artifact(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: {exc}") from None


async def install(conn: asyncpg.Connection, artifact: dict, created_by: str = "eval") -> int:
    """Make `artifact` the active calibration; earlier ones stay as history."""
    artifact = check_artifact(artifact)
    async with conn.transaction():
        await conn.execute("UPDATE calibrations SET active = false WHERE active AND property IS NULL")
        return await conn.fetchval("INSERT INTO calibrations (artifact, created_by) VALUES ($1, $2) RETURNING id",
                                   artifact, created_by)
