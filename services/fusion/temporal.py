"""Temporal priors (SPEC): where and when an individual is usually seen, as pure functions.

Per individual, from its sightings: visits per site, a 24-bin time-of-day histogram, first and
last seen, and the months it was present. Rules, each tested on its own:
- fewer than `min_sightings` (5) sightings: no temporal scoring at all (too little to know a habit);
- the detection fits the individual's habits: +`boost_one` (0.05) when its hour or its site fits,
  +`boost_both` (0.10) when both do. The hour fits when at least `hour_share` of the sightings fall
  within an hour of it (twice what a uniform day gives); the site fits when at least `site_share`
  of the sightings were at this site;
- during the rut (Nov-Dec by default) bucks roam and break their habits: the boost is x0.3;
- `temporal-conflict`: the individual was seen at another site more than 1 km away within 5 minutes
  of this detection; no deer covers that, so the candidate cannot be matched without a human.
  Sites without coordinates never conflict (their distance is unknown).
Times are UTC here; the caller passes local hours if its sites keep local time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class TemporalRules:
    min_sightings: int = 5
    boost_one: float = 0.05
    boost_both: float = 0.10
    hour_share: float = 0.25  # within +-1 h covers 3 of 24 bins: 0.125 for a uniform day; fit is twice that
    site_share: float = 0.25
    rut_months: tuple[int, ...] = (11, 12)
    rut_weight: float = 0.3
    conflict_km: float = 1.0
    conflict_minutes: float = 5.0


@dataclass(frozen=True)
class Sighting:
    site: str
    at: datetime


@dataclass
class TemporalProfile:
    """What an individual's sightings say about its habits."""

    sightings: int = 0
    site_visits: dict[str, int] = field(default_factory=dict)
    hours: list[int] = field(default_factory=lambda: [0] * 24)
    months: set[int] = field(default_factory=set)
    first_seen: datetime | None = None
    last_seen: datetime | None = None

    def as_dict(self) -> dict:
        return {"sightings": self.sightings, "site_visits": self.site_visits, "hours": self.hours,
                "months": sorted(self.months),
                "first_seen": self.first_seen.isoformat() if self.first_seen else None,
                "last_seen": self.last_seen.isoformat() if self.last_seen else None}


@dataclass(frozen=True)
class TemporalPrior:
    boost: float
    flags: tuple[str, ...]
    reason: str


def profile(sightings: Iterable[Sighting]) -> TemporalProfile:
    p = TemporalProfile()
    for s in sightings:
        p.sightings += 1
        p.site_visits[s.site] = p.site_visits.get(s.site, 0) + 1
        p.hours[s.at.hour] += 1
        p.months.add(s.at.month)
        p.first_seen = s.at if p.first_seen is None or s.at < p.first_seen else p.first_seen
        p.last_seen = s.at if p.last_seen is None or s.at > p.last_seen else p.last_seen
    return p


def hour_fit(p: TemporalProfile, hour: int) -> float:
    """Share of the sightings within an hour of `hour` (circular: 23 h is next to 0 h)."""
    if not p.sightings:
        return 0.0
    return sum(p.hours[(hour + d) % 24] for d in (-1, 0, 1)) / p.sightings


def site_fit(p: TemporalProfile, site: str) -> float:
    return p.site_visits.get(site, 0) / p.sightings if p.sightings else 0.0


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (lat, lon) points."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(h)))


def conflicts(site: str, at: datetime, sightings: Sequence[Sighting],
              coords: Mapping[str, tuple[float, float]], rules: TemporalRules = TemporalRules()) -> list[Sighting]:
    """The sightings that put the individual too far away too shortly before or after `at` at `site`."""
    here = coords.get(site)
    if here is None:
        return []
    out = []
    for s in sightings:
        there = coords.get(s.site)
        if there is None or s.site == site:
            continue
        if abs((s.at - at).total_seconds()) <= rules.conflict_minutes * 60 \
                and distance_km(here, there) > rules.conflict_km:
            out.append(s)
    return out


def prior(site: str, at: datetime, sightings: Sequence[Sighting], coords: Mapping[str, tuple[float, float]],
          rules: TemporalRules = TemporalRules()) -> TemporalPrior:
    """The temporal boost and flags of one candidate individual for a detection at `site`, `at`."""
    clash = conflicts(site, at, sightings, coords, rules)
    flags = ("temporal-conflict",) if clash else ()
    if len(sightings) < rules.min_sightings:
        return TemporalPrior(0.0, flags, f"{len(sightings)} sightings < {rules.min_sightings}: no temporal scoring")
    p = profile(sightings)
    fits = [name for name, ok in (("hour", hour_fit(p, at.hour) >= rules.hour_share),
                                  ("site", site_fit(p, site) >= rules.site_share)) if ok]
    boost = rules.boost_both if len(fits) == 2 else rules.boost_one if fits else 0.0
    reason = f"fits {'+'.join(fits)}" if fits else "fits neither hour nor site"
    if boost and at.month in rules.rut_months:
        boost *= rules.rut_weight
        reason += f"; rut x{rules.rut_weight}"
    return TemporalPrior(round(boost, 4), flags, reason)
