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

import numpy as np

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


def antler_similarity(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return None
    return float(np.dot(a, b) / (na * nb))


def candidate_scores(query: AntlerQuery, archive: list[Archived]) -> list[float]:
    """The query against each of the candidate's fingerprints of the same season and version."""
    if query.casting_window is not None or not query.present or query.fingerprint is None:
        return []
    return [s for a in archive if a.present and a.season == query.season and a.version == query.version
            and (s := antler_similarity(query.fingerprint, a.fingerprint)) is not None]


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


def antler_matrix(fingerprints: list[np.ndarray | None], seasons: list[str] | None = None) -> np.ndarray:
    """(N, N) cosines of fingerprints (NaN without evidence or across seasons): what `eval` scores."""
    n = len(fingerprints)
    out = np.full((n, n), np.nan)
    have = [i for i, f in enumerate(fingerprints) if f is not None]
    if have:
        m = np.stack([fingerprints[i] / np.linalg.norm(fingerprints[i]) for i in have])
        out[np.ix_(have, have)] = m @ m.T
    if seasons is not None:
        s = np.asarray(seasons, dtype=object)
        out[s[:, None] != s[None, :]] = np.nan
    return out
