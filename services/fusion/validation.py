"""What a feature event must be before fusion joins it. Events come from extractors fusion does not trust
(a broken model, a hostile producer on the broker): a foreign detection, an unexpected component, a vector of
the wrong size or of NaN, zeros, an unreadable coat pattern or oversized attributes are `Refused`, and the
reason goes to the dead letter."""
from __future__ import annotations

import base64
import json

import asyncpg
import numpy as np

from services.fusion.store import expected_of
from shared.coat import MAX_PATTERN_KEYPOINTS, PatternError, unpack
from shared.components.coat import PATTERN_OF
from shared.models import REGISTRY
from shared.schemas import Features

MAX_MARKS = 256
ANTLER_DIM = 64
MAX_ATTRIBUTES_BYTES = 16_000


class Refused(ValueError):
    """A feature event fusion will not join (hostile or broken); the reason goes to the dead letter."""


def coat_patterns_of(event: Features) -> dict[str, tuple[str, int, bytes]]:
    """{matcher: (version, keypoints, packed bytes)} of a coat event's patterns; Refused when one is present
    but unreadable or of a matcher fusion does not know."""
    patterns = event.attributes.get("patterns") or {}
    if not isinstance(patterns, dict):
        raise Refused("coat patterns must be an object of matcher -> pattern")
    out = {}
    for matcher, pattern in patterns.items():
        if matcher not in PATTERN_OF:
            raise Refused(f"coat pattern of unknown matcher {str(matcher)[:40]!r} (known: {sorted(PATTERN_OF)})")
        try:
            raw = base64.b64decode(pattern["data"], validate=True)
            version = str(pattern["version"])
            count = len(unpack(raw))
        except (KeyError, TypeError, ValueError, PatternError) as exc:
            raise Refused(f"coat pattern {matcher} unreadable: {exc}") from None
        if count > MAX_PATTERN_KEYPOINTS:
            raise Refused(f"coat pattern {matcher} holds {count} keypoints, over {MAX_PATTERN_KEYPOINTS}")
        out[matcher] = (version, count, raw)
    return out


def validate(event: Features, detection: asyncpg.Record,
             known_dims: dict[str, int | None]) -> dict[str, tuple[str, int, bytes]]:
    """Refuse feature events that do not belong to this detection or carry broken vectors. Returns a coat
    event's patterns as it decoded them (`coat_patterns_of`; empty for other components), so that the join
    stores them without decoding them again."""
    if event.property != detection["property"] or event.site != detection["site"]:
        raise Refused(f"event names site {event.site!r} / property {event.property!r}, the detection "
                      f"{event.detection_id} is at {detection['site']!r} / {detection['property']!r}")
    expected = expected_of(detection)
    if event.component not in expected:
        raise Refused(f"component {event.component!r} was not expected for detection {event.detection_id} "
                      f"(expects {expected})")
    for emb in event.embeddings:
        vec = emb.array()
        if not np.isfinite(vec).all():
            raise Refused(f"{emb.model} vector holds NaN or infinite values")
        spec = REGISTRY.get(emb.model)
        want = known_dims.get(emb.version) or (spec.dim if spec and emb.version.startswith(f"{spec.name}:") else None)
        if want is not None and emb.dim != want:
            raise Refused(f"{emb.model} vector has {emb.dim} dimensions; version {emb.version} has {want}")
        if float((vec * vec).sum()) == 0.0:
            raise Refused(f"{emb.model} vector is all zeros")
    if event.component == "antler":
        validate_antler(event)
    if event.component == "coat":
        marks = event.attributes.get("marks", [])
        if not isinstance(marks, list) or len(marks) > MAX_MARKS:
            raise Refused(f"coat marks must be a list of at most {MAX_MARKS} records")
        return coat_patterns_of(event)
    return {}


def validate_antler(event: Features) -> None:
    a = event.attributes
    season, window = a.get("season"), a.get("casting_window")
    if not isinstance(season, str) or not 1 <= len(season) <= 40 or \
            not (window is None or isinstance(window, str) and 1 <= len(window) <= 40):
        raise Refused("antler features need a season tag (and a casting window tag or null) of 1-40 characters")
    if len(json.dumps(a, default=str)) > MAX_ATTRIBUTES_BYTES:
        raise Refused(f"antler attributes over {MAX_ATTRIBUTES_BYTES} bytes")
    if event.status == "ok" and [e.dim for e in event.embeddings] != [ANTLER_DIM]:
        raise Refused(f"antler features with antlers carry one {ANTLER_DIM}-d fingerprint")
    if event.status != "ok" and event.embeddings:
        raise Refused("antler features without evidence carry no fingerprint")
