"""Fusion's pure rules between the gallery search and what a decision records (services/fusion/policy.py,
result.py), without a database."""
from __future__ import annotations

import math
import uuid

from services.fusion.decision import ASSIGNED
from services.fusion.policy import identity_scores, pose_verdict, sighting_decision
from services.fusion.result import graph_edges
from services.fusion.scoring import Candidate, FusionModel
from shared.schemas import PipelineConfig

ENHANCED = PipelineConfig(mode="enhanced", pose=True)


def test_pose_is_asked_for_an_uncertain_body_match_unless_the_sighting_decides():
    assert pose_verdict(None, False, 0.5, ENHANCED, sighting_decides=False)[0] is True
    assert pose_verdict(None, False, 0.9, ENHANCED, sighting_decides=False)[0] is False
    ask, recorded = pose_verdict(None, False, 0.5, ENHANCED, sighting_decides=True)
    assert not ask and recorded == {"ran": False, "why": "an earlier frame of the sighting decided"}


def test_a_pose_asked_for_is_recorded_answered_or_not():
    assert pose_verdict(None, True, None, ENHANCED, False) == (
        False, {"ran": False, "why": "requested; no answer before the join deadline"})
    answer = {"ran": True, "viewpoint": "left"}
    ask, recorded = pose_verdict(answer, True, None, ENHANCED, False)
    assert not ask and recorded == {**answer, "why": "requested: the body-only match was uncertain"}


def test_identity_scores_leave_out_the_excluded_and_calibrations_of_another_extractor():
    exemplar_scores = {"body:m": {1: [0.9, 0.7], 2: [0.8], 3: []}, "coat:colour": {1: [0.6]}, "antler": {1: [0.4]}}
    scores = identity_scores(exemplar_scores, {2}, "best", None, "coat-v1", None)
    assert scores["body:m"][1] == 0.9 and 2 not in scores["body:m"] and math.isnan(scores["body:m"][3])
    assert set(scores) == {"body:m", "coat:colour", "antler"}  # without a fitted model every component counts
    fitted = FusionModel("1", {}, {}, 0.0, coat_version="coat-v2", antler_version=None)
    assert set(identity_scores(exemplar_scores, set(), "best", fitted, "coat-v1", None)) == {"body:m", "antler"}
    assert set(identity_scores(exemplar_scores, set(), "best", fitted, "coat-v2", "fp-v1")) == {"body:m", "coat:colour"}


def test_the_sighting_decides_with_the_linked_individuals_score_when_it_is_a_candidate():
    candidates = [Candidate(4, 0.9), Candidate(7, 0.6)]
    decision = sighting_decision(7, candidates)
    assert (decision.state, decision.individual_id, decision.score, decision.flags) == (ASSIGNED, 7, 0.6, ("sighting",))
    assert sighting_decision(9, candidates).score is None


def test_graph_edges_join_each_candidates_closest_photo_without_the_temporal_boost():
    detection, photo = uuid.uuid4(), uuid.uuid4()
    boosted = Candidate(4, 0.9, {"body:m": 0.8, "coat:colour": None}, temporal_boost=0.05)
    no_photo = Candidate(5, 0.7, {"body:m": 0.7})
    fitted = FusionModel("1", {}, {}, 0.0)
    [(to, components, probability)] = graph_edges(detection, [boosted, no_photo], {4: 40, 5: 50}, {40: photo},
                                                  fitted)
    assert (to, components) == (photo, {"body:m": 0.8}) and math.isclose(probability, 0.85)
    assert graph_edges(detection, [boosted], {4: 40}, {40: detection}, fitted) == []  # never to itself
    assert graph_edges(detection, [boosted], {4: 40}, {40: photo}, None)[0][2] is None  # no fitted model
