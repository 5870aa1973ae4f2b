"""Fusion's pure logic: temporal rules, exemplar choice, calibrated scoring, the join's pipeline rules."""
from __future__ import annotations

import base64
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from deer_reid.evaluation import calibration as cal
from shared import exemplars
from services.fusion.decision import REVIEW, Thresholds, decide
from services.fusion.scoring import FusionModel, score_candidates, with_temporal_boost
from services.fusion.validation import Refused, validate
from services.fusion.temporal import Sighting, TemporalRules, conflicts, distance_km, hour_fit, prior, profile
from shared.pipeline import body_models_for, expected_components, wants_pose
from shared.schemas import Embedding, Features, PipelineConfig

UTC = timezone.utc
JUNE = datetime(2025, 6, 10, 6, 30, tzinfo=UTC)
# two sites 2.2 km apart, one 300 m from the first
COORDS = {"north": (45.000, -93.000), "south": (44.980, -93.000), "near": (45.0027, -93.000)}


def habitual(n: int, site: str = "north", hour: int = 6, start: datetime = JUNE) -> list[Sighting]:
    return [Sighting(site, start.replace(hour=hour) - timedelta(days=d)) for d in range(1, n + 1)]


# ---- temporal priors -------------------------------------------------------------------------------

def test_fewer_than_five_sightings_get_no_temporal_scoring():
    p = prior("north", JUNE, habitual(4), COORDS)
    assert p.boost == 0.0 and "no temporal scoring" in p.reason


def test_hour_and_site_both_fitting_boost_by_the_most():
    assert prior("north", JUNE, habitual(8), COORDS).boost == pytest.approx(0.10)


def test_hour_or_site_alone_boosts_by_the_least():
    assert prior("south", JUNE, habitual(8), COORDS).boost == pytest.approx(0.05)  # right hour, other site
    assert prior("north", JUNE.replace(hour=18), habitual(8), COORDS).boost == pytest.approx(0.05)
    assert prior("south", JUNE.replace(hour=18), habitual(8), COORDS).boost == 0.0


def test_hour_of_day_wraps_around_midnight():
    p = profile(habitual(6, hour=23))
    assert hour_fit(p, 0) == 1.0 and hour_fit(p, 2) == 0.0


def test_the_rut_weighs_the_boost_by_three_tenths():
    november = datetime(2025, 11, 20, 6, 30, tzinfo=UTC)
    assert prior("north", november, habitual(8, start=november), COORDS).boost == pytest.approx(0.03)
    rules = TemporalRules(rut_months=(10,))
    assert prior("north", november, habitual(8, start=november), COORDS, rules).boost == pytest.approx(0.10)


def test_two_sites_over_a_km_apart_within_five_minutes_conflict():
    assert distance_km(COORDS["north"], COORDS["south"]) == pytest.approx(2.22, abs=0.01)
    seen = [Sighting("south", JUNE - timedelta(minutes=3))]
    assert conflicts("north", JUNE, seen, COORDS) == seen
    assert "temporal-conflict" in prior("north", JUNE, seen, COORDS).flags  # even with < 5 sightings
    assert not conflicts("north", JUNE, [Sighting("south", JUNE - timedelta(minutes=6))], COORDS)
    assert not conflicts("north", JUNE, [Sighting("near", JUNE - timedelta(minutes=1))], COORDS)  # 300 m
    assert not conflicts("north", JUNE, [Sighting("unmapped", JUNE)], COORDS)  # no coordinates: unknown


def test_a_conflicting_best_match_goes_to_review_not_to_the_individual():
    from services.fusion.scoring import Candidate

    best = with_temporal_boost(Candidate(1, 0.95), 0.0, ("temporal-conflict",))
    d = decide([best], Thresholds(match=0.8, new=0.6))
    assert d.state == REVIEW and "temporal-conflict" in d.flags


def test_the_boost_reorders_candidates_and_is_capped_at_one():
    from services.fusion.scoring import Candidate

    a, b = Candidate(1, 0.80), Candidate(2, 0.78)
    assert with_temporal_boost(b, 0.05, ()).score > a.score
    assert with_temporal_boost(Candidate(3, 0.98), 0.10, ()).score == 1.0


# ---- exemplars -------------------------------------------------------------------------------------

def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_exemplars_keep_the_newest_then_the_most_different_looks():
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    items = [exemplars.ExemplarCandidate(0, _unit([1, 0, 0]), t0),
             exemplars.ExemplarCandidate(1, _unit([1, 0.01, 0]), t0 + timedelta(days=1)),  # a burst twin of 0
             exemplars.ExemplarCandidate(2, _unit([0, 1, 0]), t0 + timedelta(days=2)),
             exemplars.ExemplarCandidate(3, _unit([0, 0, 1]), t0 + timedelta(days=3))]
    chosen = exemplars.choose(items, 3)
    assert chosen[0] == 3  # the newest
    assert set(chosen) == {3, 2, 0} or set(chosen) == {3, 2, 1}
    assert not {0, 1} <= set(chosen)  # never both burst twins while another look is left out
    assert exemplars.choose(items, 10) == [0, 1, 2, 3]


def test_exemplars_are_shared_out_across_viewpoints():
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    left = [exemplars.ExemplarCandidate(f"l{i}", _unit([1, i, 0]), t0 + timedelta(days=i), "left") for i in range(6)]
    right = [exemplars.ExemplarCandidate("r0", _unit([0, 0, 1]), t0, "right")]
    chosen = exemplars.choose(left + right, 3)
    assert "r0" in chosen and len(chosen) == 3


# ---- calibrated scoring ------------------------------------------------------------------------------

def _model() -> FusionModel:
    return FusionModel.from_artifact({"version_id": 1, "fusion": {
        "calibrations": {"body:a": {"x": [0.2, 0.8], "y": [0.0, 1.0], "prior": 0.1},
                         "coat": {"x": [0.0, 1.0], "y": [0.2, 0.9], "prior": 0.3}},
        "weights": {"body:a": 1.5, "coat": 0.5}, "intercept": -0.2, "aggregation": "best"}})


def test_fitted_fusion_records_raw_calibrated_and_weight_per_component():
    (c,) = score_candidates({"body:a": {7: 0.5}, "coat": {7: 1.0}}, _model())
    assert c.calibrated["body:a"] == pytest.approx(0.5) and c.calibrated["coat"] == pytest.approx(0.9)
    z = -0.2 + 1.5 * 0 + 0.5 * np.log(0.9 / 0.1)
    assert c.score == pytest.approx(1 / (1 + np.exp(-z)))
    d = c.as_dict()["components"]["coat"]
    assert d == {"raw": 1.0, "calibrated": 0.9, "weight": 0.5}


def test_a_component_with_no_evidence_contributes_its_prior():
    (c,) = score_candidates({"body:a": {7: 0.5}, "coat": {}}, _model(), no_evidence=frozenset({"coat"}))
    z = -0.2 + 0.5 * np.log(0.3 / 0.7)
    assert c.components["coat"] is None and c.score == pytest.approx(1 / (1 + np.exp(-z)))


def test_fusion_fit_weighs_the_informative_component_more():
    rng = np.random.default_rng(0)
    ids = [f"i{n // 4}" for n in range(40)]
    same = np.equal.outer(ids, ids)
    good = np.where(same, 0.8, 0.3) + rng.normal(0, 0.05, same.shape)
    noise = rng.uniform(0, 1, same.shape)
    fusion = cal.fit_fusion({"good": good, "noise": noise}, range(40), ids, [str(n) for n in range(40)])
    assert fusion["weights"]["good"] > 5 * abs(fusion["weights"]["noise"])
    model = FusionModel.from_artifact({"fusion": fusion})
    fused = cal.fused_similarity({"good": good, "noise": noise}, model)
    assert fused[0, 1] > 0.9 > 0.1 > fused[0, 39]


# ---- pipeline rules --------------------------------------------------------------------------------

def test_expected_components_follow_mode_switches_and_class():
    fast = PipelineConfig(mode="fast", coat=True, antler=True)
    assert expected_components(fast, "buck") == ["body"]
    enhanced = PipelineConfig(mode="enhanced", coat=True, antler=True)
    assert expected_components(enhanced, "buck") == ["body", "coat", "antler"]
    assert expected_components(enhanced, "doe") == ["body", "coat"]  # antler only for antlered classes
    assert expected_components(PipelineConfig(mode="enhanced"), "buck") == ["body"]


def test_pose_is_selective_and_never_in_fast_mode():
    on = PipelineConfig(mode="enhanced", pose=True)
    assert wants_pose(on, 0.5)[0] and not wants_pose(on, 0.8)[0]
    assert not wants_pose(PipelineConfig(mode="fast", pose=True), 0.1)[0]
    assert not wants_pose(PipelineConfig(mode="enhanced", pose=False), 0.1)[0]


def test_the_ensemble_switch_chooses_the_body_models():
    assert body_models_for(PipelineConfig(mode="enhanced"), ["a"], ["a", "b"]) == ["a", "b"]
    assert body_models_for(PipelineConfig(mode="enhanced", ensemble=False), ["a"], ["a", "b"]) == ["a"]
    assert body_models_for(PipelineConfig(mode="fast"), ["a"], ["a", "b"]) == ["a"]


# ---- what fusion refuses to join -------------------------------------------------------------------

def _features(component="body", vector=None, dim=1280, **over):
    vec = np.ones(dim, dtype=np.float32) if vector is None else vector
    fields = dict(component=component, detection_id=uuid.uuid4(), site="s1", property="p", camera="c",
                  captured_at=JUNE, cls="doe",
                  embeddings=[Embedding.of("efficientnet_lite0", "efficientnet_lite0:abc:x", vec, False)])
    return Features(**{**fields, **over})


DETECTION = {"property": "p", "site": "s1", "expected": ["body"]}


@pytest.mark.parametrize("event, message", [
    (_features(vector=np.full(1280, np.nan, dtype=np.float32)), "NaN"),
    (_features(dim=512), "512 dimensions"),
    (_features(vector=np.zeros(1280, dtype=np.float32)), "all zeros"),
    (_features(component="coat", embeddings=[]), "not expected"),
    (_features(site="elsewhere"), "is at 's1'"),
])
def test_broken_or_foreign_features_are_refused_with_the_reason(event, message):
    with pytest.raises(Refused, match=message):
        validate(event, DETECTION, {})


def test_a_version_seen_before_fixes_its_dimension():
    with pytest.raises(Refused, match="has 64"):
        validate(_features(), DETECTION, {"efficientnet_lite0:abc:x": 64})
    validate(_features(), DETECTION, {"efficientnet_lite0:abc:x": 1280})


def test_coat_events_with_unreadable_patterns_or_too_many_marks_are_refused():
    from services.fusion.validation import MAX_MARKS, Refused, validate

    detection = {**DETECTION, "expected": ["body", "coat"]}
    broken = _features("coat", embeddings=[], attributes={"marks": [], "patterns": {"xfeat": {"version": "v",
                                                                                            "data": "AAAA"}}})
    with pytest.raises(Refused, match="coat pattern xfeat unreadable"):
        validate(broken, detection, {})
    for patterns, message in [({"surf": {"version": "v", "data": "AAAA"}}, "unknown matcher"),
                              ([1, 2], "must be an object"), ({"rootsift": "AAAA"}, "rootsift unreadable")]:
        with pytest.raises(Refused, match=message):
            validate(_features("coat", embeddings=[], attributes={"marks": [], "patterns": patterns}), detection, {})
    from shared.coat import MAX_PATTERN_KEYPOINTS, Pattern, pack

    n = MAX_PATTERN_KEYPOINTS + 1  # readable, but its matching would hold a matrix of n x n per photo
    oversized = base64.b64encode(pack(Pattern("rsf1", np.zeros((n, 2), np.float32), np.ones((n, 128), np.int8))))
    with pytest.raises(Refused, match=f"holds {n} keypoints"):
        validate(_features("coat", embeddings=[], attributes={
            "marks": [], "patterns": {"rootsift": {"version": "v", "data": oversized.decode()}}}), detection, {})
    too_many = _features("coat", embeddings=[], attributes={"marks": [{}] * (MAX_MARKS + 1)})
    with pytest.raises(Refused, match="marks"):
        validate(too_many, detection, {})
    validate(_features("coat", embeddings=[], attributes={"marks": []}), detection, {})


def test_antler_events_without_a_season_or_with_a_wrong_fingerprint_are_refused():
    from services.fusion.validation import Refused, validate

    detection = {**DETECTION, "expected": ["body", "antler"]}
    fp = [Embedding.of("antler", "antler-fp64:x", np.ones(64, dtype=np.float32), False)]
    season = {"season": "2024-rut", "casting_window": None, "present": True}

    def antler(status="ok", embeddings=fp, attributes=season):
        return _features("antler", status=status, embeddings=embeddings, attributes=attributes, cls="buck")

    validate(antler(), detection, {})
    validate(antler("no-evidence", [], {**season, "present": False}), detection, {})
    for event, message in [
        (antler(attributes={"present": True}), "season tag"),
        (antler(attributes={**season, "season": "x" * 41}), "season tag"),
        (antler(attributes={**season, "casting_window": 7}), "season tag"),
        (antler(attributes={**season, "geometry": {"junk": "x" * 20_000}}), "over 16000 bytes"),
        (antler(embeddings=[Embedding.of("antler", "antler-fp64:x", np.ones(32, dtype=np.float32), False)]),
         "one 64-d fingerprint"),
        (antler(embeddings=[]), "one 64-d fingerprint"),
        (antler("no-evidence"), "carry no fingerprint"),
    ]:
        with pytest.raises(Refused, match=message):
            validate(event, detection, {})


def test_a_new_sighting_joins_the_gallery_until_full_then_rechooses_every_half_gallery():
    from shared.exemplars import JOIN, KEEP, RECHOOSE, on_new_sighting

    steps = [on_new_sighting(min(s - 1, 8), s, 8) for s in range(1, 17)]  # 8 slots, one sighting at a time
    assert steps[:8] == [JOIN] * 8
    assert steps[8:] == [KEEP, KEEP, KEEP, RECHOOSE, KEEP, KEEP, KEEP, RECHOOSE]  # sightings 12 and 16
    assert on_new_sighting(1, 7, 1) == RECHOOSE  # a one-slot gallery re-chooses at every sighting


def test_one_blas_thread_leaves_numpy_on_one_thread_until_restored():
    """Fusion's coat matching runs its matrix products on one BLAS thread: beside busy services a second
    thread only spins (shared.service.one_blas_thread says what it cost)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from shared.service import one_blas_thread

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    with threadpool_limits(2, user_api="blas"):
        assert blas_threads() == {2}
        limiter = one_blas_thread()
        try:
            assert blas_threads() == {1}
        finally:
            limiter.restore_original_limits()
        assert blas_threads() == {2}
