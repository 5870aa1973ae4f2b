"""The antler component, and the season rules around it (pure).

- `antler`: cosine of two 64-d fingerprints of the same version *and the same season tag*; a candidate's
  score is its best over its archived fingerprints of the query's season. Other seasons never count:
  antlers are cast and regrown every year.
- In the casting window no antler score is given: the result is flagged `antler-seasonal-transition`
  and fusion decides on body and coat.
- Possible duplicate profile (sent to review, never merged or founded silently):
  - the best candidate matches on body/coat but its same-season antlers disagree (best similarity
    below `conflict_below`);
  - or, within one casting window, one sighting shows antlers *after* another showed the region
    readable and empty: a buck does not regrow a rack in weeks, so these are two bucks, or one photo
    is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

import numpy as np

from shared.components.base import Component, cosine, grouped, register

ANTLER = "antler"
TRANSITION = "antler-seasonal-transition"
DUPLICATE = "possible-duplicate-profile"


@dataclass(frozen=True)
class AntlerQuery:
    season: str
    casting_window: str | None
    present: bool | None  # None: unknown (the region could not be read)
    version: str | None
    fingerprint: np.ndarray | None
    captured_at: datetime


@dataclass(frozen=True)
class Archived:
    """One archived antler sighting of a candidate."""

    season: str
    casting_window: str | None
    present: bool
    version: str | None
    fingerprint: np.ndarray | None
    captured_at: datetime


class AntlerSimilarity(Component):
    """Items: `AntlerQuery` on the query side, `Archived` on the gallery side (the same fields). A query in a
    casting window, or without a readable rack, scores nothing; other seasons and versions never meet."""

    name, reads = ANTLER, ANTLER

    def similarity(self, queries: Sequence[AntlerQuery], gallery: Sequence[Archived]) -> np.ndarray:
        def scored(query):
            usable = query.casting_window is None and query.present and query.fingerprint is not None
            return (query.season, query.version) if usable else None

        def archived(a):
            return (a.season, a.version) if a.present and a.fingerprint is not None else None

        return grouped(queries, gallery, scored, lambda q, g: cosine(np.stack([x.fingerprint for x in q]),
                                                                     np.stack([x.fingerprint for x in g])), archived)


SIMILARITY = register(AntlerSimilarity())


def candidate_scores(query: AntlerQuery, archive: list[Archived]) -> list[float]:
    """The query against each of the candidate's fingerprints of the same season and version."""
    if not archive:
        return []
    return [float(s) for s in SIMILARITY.similarity([query], archive)[0] if not np.isnan(s)]


def transition_conflict(query: AntlerQuery, archive: list[Archived]) -> bool:
    """Within one casting window: antlers seen after a readable, empty region (in either order of upload)."""
    if query.casting_window is None or query.present is None:
        return False
    same = [a for a in archive if a.casting_window == query.casting_window]
    if query.present:
        return any(not a.present and a.captured_at < query.captured_at for a in same)
    return any(a.present and a.captured_at > query.captured_at for a in same)


def flags_for(query: AntlerQuery, archive: list[Archived], best_scores: list[float], conflict_below: float) -> list[str]:
    """The season flags of the query against its best candidate (`best_scores`: candidate_scores of it)."""
    flags = [TRANSITION] if query.casting_window is not None else []
    if transition_conflict(query, archive) or (best_scores and max(best_scores) < conflict_below):
        flags.append(DUPLICATE)
    return flags
