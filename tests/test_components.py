"""The component interface: a matcher added in one module and one registration reaches the fusion service's
scoring and `deer-reid eval` without either changing. The matcher here is a toy written for the test."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pytest

from deer_reid.evaluation import calibration as cal
from deer_reid.evaluation.coat import coat_matrices
from services.fusion.scoring import FusionModel, score_candidates, shortlist_scores
from shared.calibrated import fit_components
from shared.components import Component, aggregate, component, reading, register, unregister
from shared.components.coat import COAT, view_of

TOY = "coat:same-facing"


class SameFacing(Component):
    """1 when two coats face the same way, 0 when they face opposite ways, no evidence when either is unknown."""

    name, reads = TOY, COAT

    def similarity(self, queries: Sequence[Mapping], gallery: Sequence[Mapping]) -> np.ndarray:
        def side(view):
            return {"left": 0.0, "right": 1.0}.get(view.get("facing"), np.nan)

        q = np.array([side(v) for v in queries])[:, None]
        g = np.array([side(v) for v in gallery])[None, :]
        return np.where(np.isnan(q) | np.isnan(g), np.nan, (q == g).astype(float))


@pytest.fixture
def toy():
    register(SameFacing())
    yield component(TOY)
    unregister(TOY)


def _view(facing):
    return view_of({}, facing, {})


def test_a_registered_component_is_scored_and_recorded_by_fusion_unchanged(toy):
    assert toy in reading(COAT)
    gallery = [(7, _view("left")), (7, _view("right")), (8, _view("right")), (9, _view(None))]
    scores = shortlist_scores(reading(COAT), _view("left"), gallery)
    assert scores[TOY] == {7: [1.0, 0.0], 8: [0.0], 9: []}

    # a fusion fitted with the toy beside another component weighs it like any other
    rng = np.random.default_rng(0)
    same = rng.random(400) < 0.3
    raw = {TOY: np.where(same, 1.0, (rng.random(400) < 0.5).astype(float)), "body:toy": rng.normal(same * 0.3, 0.2)}
    calibrations, weights, intercept = fit_components(raw, same)
    model = FusionModel.from_artifact({"version_id": "t", "fusion": {"calibrations": calibrations, "weights": weights,
                                                                   "intercept": intercept}})
    per_individual = {TOY: {ind: v for ind, s in scores[TOY].items() if (v := aggregate(s)) is not None},
                      "body:toy": {7: 0.3, 8: 0.3}}
    candidates = score_candidates(per_individual, model)
    assert [c.individual_id for c in candidates] == [7, 8]  # the same body score; the toy tells them apart
    recorded = candidates[0].as_dict()["components"][TOY]
    assert recorded["raw"] == 1.0 and recorded["weight"] == pytest.approx(weights[TOY], abs=1e-5)
    assert recorded["calibrated"] > candidates[1].as_dict()["components"][TOY]["calibrated"]


class CostlySameFacing(SameFacing):
    name, costly = "coat:same-facing-costly", True


@pytest.fixture
def costly_toy():
    register(CostlySameFacing())
    yield component(CostlySameFacing.name)
    unregister(CostlySameFacing.name)


def test_a_costly_component_compares_only_the_first_of_the_shortlist_in_fusion_and_in_eval(toy, costly_toy):
    gallery = [(7, _view("left")), (8, _view("right")), (9, _view("left"))]
    scores = shortlist_scores(reading(COAT), _view("left"), gallery, costly_shortlist=2)
    assert scores[TOY] == {7: [1.0], 8: [0.0], 9: [1.0]}  # the cheap one sees the whole shortlist
    assert scores[costly_toy.name] == {7: [1.0], 8: [0.0]}  # 9 is absent from the costly one's shortlist
    assert shortlist_scores(reading(COAT), _view("left"), gallery)[costly_toy.name] == {7: [1.0], 8: [0.0], 9: [1.0]}

    # eval scores a costly component against the shorter shortlist too; beyond it a photo takes the floor of
    # its row, as fusion's "absent from the shortlist" rule gives it
    facings = ["left", "right", "left", "left"]
    feats = [{"embeddings": {}, "attributes": {"facing": f}} for f in facings]
    mask = ~np.eye(4, dtype=bool)
    first = np.zeros((4, 4), dtype=bool)
    first[0, 1] = first[1, 0] = first[2, 0] = first[3, 0] = True
    matrices, _, _ = coat_matrices(feats, mask, service={}, variants=(), pattern_mask=first)
    cheap, costly = matrices[TOY], matrices[costly_toy.name]
    assert cheap[2, 1] == 0.0 and cheap[2, 3] == 1.0  # every pair of the shortlist compared
    assert costly[2, 0] == 1.0 and costly[2, 1] == 1.0 == costly[2, 3]  # only 2-0 compared: the rest its floor
    assert costly[0, 1] == 0.0 and costly[0, 2] == 0.0  # row 0 compared 0-1 (left, right): its floor is 0


def test_a_registered_component_is_measured_by_eval_unchanged(toy):
    facings = ["left", "left", "right", "right", None, "left"]
    feats = [{"embeddings": {}, "attributes": {"facing": f}} for f in facings]
    shortlist = ~np.eye(len(facings), dtype=bool)
    matrices, _, _ = coat_matrices(feats, shortlist, service={}, variants=())
    expected = toy.similarity([_view(f) for f in facings], [_view(f) for f in facings])
    np.testing.assert_array_equal(np.where(shortlist, matrices[TOY], np.nan), np.where(shortlist, expected, np.nan))

    # and calibration fits it from the labelled photos like a built-in component
    identities = ["a", "a", "b", "b", "c", "a"]
    fusion = cal.fit_fusion({TOY: matrices[TOY]}, range(len(facings)), identities, [str(i) for i in range(6)])
    assert set(fusion["calibrations"]) == {TOY} and fusion["weights"] == {TOY: 1.0}


def test_unregistered_components_are_gone_and_unknown_names_say_what_is_known():
    assert TOY not in {c.name for c in reading(COAT)}
    with pytest.raises(KeyError, match="registered"):
        component(TOY)


def test_an_artifact_fitted_under_a_former_component_name_is_read_with_the_current_one():
    from shared.calibration_artifact import FORMER_NAMES, check_artifact

    assert all(component(new) for new in FORMER_NAMES.values())  # each new name is a registered component
    curve = {"x": [0.0, 1.0], "y": [0.1, 0.9], "prior": 0.2}
    artifact = {"kind": "deer-reid-calibration", "version": 2, "thresholds": {"match": 0.8, "new": 0.3},
                "embedding_versions": {"m": "m:1"},
                "fusion": {"calibrations": {"coat:pattern-xfeat": curve, "body:m": curve},
                           "weights": {"coat:pattern-xfeat": 0.5, "body:m": 1.0}, "intercept": 0.0}}
    checked = check_artifact(artifact)
    assert checked["fusion"]["weights"] == {"coat:pattern-xfeat": 0.5, "body:m": 1.0}
    assert set(checked["fusion"]["calibrations"]) == {"coat:pattern-xfeat", "body:m"}
    assert "coat:pattern-xfeat" in artifact["fusion"]["weights"]  # the caller's copy is left as it was


def test_narrowed_keeps_the_best_scored_in_the_given_order_ties_and_no_evidence_last():
    from shared.components import narrowed

    assert narrowed([10, 11, 12, 13], [0.2, 0.9, 0.2, 0.5], 2) == [11, 13]
    assert narrowed([10, 11, 12, 13], [0.2, 0.9, 0.2, 0.5], 3) == [10, 11, 13]  # the tie: the first (closest) kept
    assert narrowed([10, 11, 12], [np.nan, 0.1, np.nan], 2) == [10, 11]  # no evidence ranks last, in order
    assert narrowed([4, 5], [0.3, 0.1], 10) == [4, 5]


def test_the_coat_cascade_verifies_the_same_photos_in_fusion_and_in_eval(nyala_paths):
    """The costlier keypoint matcher (RootSIFT) compares only the photos the cheaper one (XFeat) matched best,
    in fusion's scoring and in eval's masks alike, photo for photo, on real patterns."""
    from PIL import Image

    from deer_reid.evaluation.coat import cascade_masks, closest
    from services.coat.pattern import PatternExtractor
    from shared.coat import pack
    from shared.components.coat import PATTERN_OF

    extract = {"xfeat": PatternExtractor("xfeat", 256), "rootsift": PatternExtractor("rootsift", 400, 0.01)}
    rgb = [np.array(Image.open(p).convert("RGB")) for p in nyala_paths[:7]]
    packed = [{m: pack(e(x)) for m, e in extract.items()} for x in rgb]
    service = {"xfeat-animal": PATTERN_OF["xfeat"], "rootsift-animal": PATTERN_OF["rootsift"]}
    feats = [{"embeddings": {}, "attributes": {}, "xfeat-animal": p["xfeat"], "rootsift-animal": p["rootsift"]}
             for p in packed]
    n = len(feats)
    body = np.random.default_rng(1).standard_normal((n, n))
    ranked = closest(body + body.T, list(range(n)), n - 1)  # every other photo, in a body order
    everything = ~np.eye(n, dtype=bool)
    _, _, raw = coat_matrices(feats, everything, service, variants=tuple(service), pattern_mask=everything)
    masks = cascade_masks({name: raw[v] for v, name in service.items()},
                          {name: np.ones(n, dtype=bool) for name in service.values()}, everything, ranked, 2)
    masks = {v: masks[name] for v, name in service.items()}
    assert (masks["xfeat-animal"] == everything).all() and (masks["rootsift-animal"].sum(1) == 2).all()
    for i in range(n):
        view = view_of({}, None, {m: ("v", p) for m, p in packed[i].items()})
        gallery = [(int(j), view_of({}, None, {m: ("v", p) for m, p in packed[j].items()})) for j in ranked[i]]
        scores = shortlist_scores(reading(COAT), view, gallery, cascade=2)
        assert set(scores[PATTERN_OF["xfeat"]]) == set(ranked[i].tolist())
        assert set(scores[PATTERN_OF["rootsift"]]) == set(np.flatnonzero(masks["rootsift-animal"][i]).tolist())
        xfeat_best = sorted(ranked[i].tolist(), key=lambda j: -max(scores[PATTERN_OF["xfeat"]][j] or [-1]))[:1]
        assert set(xfeat_best) <= set(scores[PATTERN_OF["rootsift"]])  # XFeat's best is always verified
        without = shortlist_scores(reading(COAT), view, gallery)  # no cascade: every photo verified
        assert set(without[PATTERN_OF["rootsift"]]) == set(ranked[i].tolist())
