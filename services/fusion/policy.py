"""The rules between the gallery search and the decision: which scores count, the temporal priors, the antler
season rules, an earlier frame of the sighting, and whether pose is asked first. Pure, except the two readers
(`temporal_priors`, `sighting_link`) that fetch what their rule needs."""
from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Mapping

import asyncpg

from services.fusion import store
from services.fusion.decision import ASSIGNED, COMPATIBLE_SEXES, Decision
from services.fusion.scoring import Candidate, FusionModel, score_candidates, with_temporal_boost
from services.fusion.temporal import Sighting, TemporalRules, prior
from shared.components import aggregate, component_of
from shared.components import antler as antler_rules
from shared.pipeline import wants_pose
from shared.schemas import PipelineConfig

TEMPORAL_CANDIDATES = 10  # temporal priors are looked up for the best few candidates only


def identity_scores(exemplar_scores: Mapping[str, Mapping[int, list[float]]], excluded: set[int], aggregation: str,
                    model: FusionModel | None, coat_version: str | None,
                    antler_version: str | None) -> dict[str, dict[int, float]]:
    """{component: {individual: its score}} from its exemplars' scores (NaN: none), without the `excluded`
    individuals, and without the coat or antler scores when the fitted model's calibration is of another
    extractor version than the detection's."""
    per_component = {name: {ind: _or_nan(aggregate(sims, aggregation)) for ind, sims in by_ind.items()
                            if ind not in excluded}
                     for name, by_ind in exemplar_scores.items()}
    if model is not None and coat_version != model.coat_version:
        # coat calibrations apply only to the coat extractor they were fitted on
        per_component = {k: v for k, v in per_component.items() if component_of(k) != "coat"}
    if model is not None and antler_version != model.antler_version:
        per_component.pop(antler_rules.ANTLER, None)  # antler calibrations apply to their fingerprint only
    return per_component


async def temporal_priors(conn: asyncpg.Connection, det: asyncpg.Record, candidates: list[Candidate],
                          rules: TemporalRules) -> list[Candidate]:
    """`with_temporal_priors` of the best TEMPORAL_CANDIDATES, with their sightings and the property's sites."""
    sightings = await store.sightings(conn, [c.individual_id for c in candidates[:TEMPORAL_CANDIDATES]])
    coords = await store.site_coordinates(conn, det["property"])
    return with_temporal_priors(det["site"], det["captured_at"], candidates, sightings, coords, rules)


def with_temporal_priors(site: str, at: datetime, candidates: list[Candidate], sightings: Mapping[int, list[Sighting]],
                         coords: Mapping[str, tuple[float, float]], rules: TemporalRules) -> list[Candidate]:
    """The candidates re-ranked after each one whose `sightings` are given takes its temporal prior (boost
    and flags) for a detection at `site`, `at`."""
    out = []
    for c in candidates:
        if c.individual_id in sightings:
            p = prior(site, at, sightings[c.individual_id], coords, rules)
            c = with_temporal_boost(c, p.boost, p.flags)
        out.append(c)
    out.sort(key=lambda c: (-c.score, c.individual_id))
    return out


def antler_flags(antler: dict, candidates: list[Candidate], new_threshold: float,
                 conflict_below: float) -> list[Candidate]:
    """The season rules against the best candidate: a possible duplicate profile goes to review. The flags
    the rules gave the best candidate are kept in `antler["best_flags"]` (the result shows them)."""
    best = candidates[0]
    archive = antler["archives"].get(best.individual_id, [])
    flags = antler_rules.flags_for(antler["query"], archive, antler["scores"].get(best.individual_id, []),
                                   conflict_below)
    antler["best_flags"] = flags
    if antler_rules.DUPLICATE in flags and best.score >= new_threshold:
        # a flag only: the score and its temporal boost stay as they were (the graph's edge subtracts it)
        return [dataclasses.replace(best, flags=(*best.flags, antler_rules.DUPLICATE)), *candidates[1:]]
    return candidates


async def sighting_link(conn: asyncpg.Connection, det: asyncpg.Record, sex: str, excluded: set[int]) -> int | None:
    """The individual an earlier frame of this detection's sighting was placed in, if it may take this one."""
    linked = await store.sighting_individual(conn, det["id"], det["sighting"])
    if linked is None or linked in excluded:
        return None
    # a merge moves the earlier frame's detection too, so a merged-away individual here would be a bug
    their_sex = await store.unmerged_sex(conn, linked)
    return linked if their_sex in COMPATIBLE_SEXES[sex] else None


def sighting_decision(linked: int, candidates: list[Candidate]) -> Decision:
    """Frames of one burst with one animal each are one animal: the sighting decides, flagged."""
    score = next((c.score for c in candidates if c.individual_id == linked), None)
    return Decision(ASSIGNED, linked, score, ("sighting",), tuple(candidates[:5]))


def body_only_score(per_component: Mapping[str, Mapping[int, float]], model: FusionModel | None,
                    spec_weights: Mapping[str, float]) -> float | None:
    """The best candidate's fused score by the body models alone (None without candidates): how sure the
    match is before pose."""
    body = score_candidates({k: v for k, v in per_component.items() if component_of(k) == "body"},
                            model, spec_weights)
    return body[0].score if body else None


def pose_verdict(pose: dict | None, pose_expected: bool, body_only: float | None, config: PipelineConfig,
                 sighting_decides: bool) -> tuple[bool, dict]:
    """(whether to ask pose before deciding, what the result records of pose). Pose not expected yet is asked
    when the body-only match (`body_only`) is uncertain and no earlier frame of the sighting decides; pose
    expected was asked before and answered (`pose`) or not by the join's deadline."""
    if not pose_expected:
        ask, why = wants_pose(config, body_only)
        if sighting_decides:
            ask, why = False, "an earlier frame of the sighting decided"
        return ask, {"ran": False, "why": why}
    if pose is None:
        return False, {"ran": False, "why": "requested; no answer before the join deadline"}
    return False, {**pose, "why": "requested: the body-only match was uncertain"}


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value
