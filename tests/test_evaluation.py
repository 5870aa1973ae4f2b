"""The evaluation: metrics on hand-worked cases, CSV errors, and the loo protocol on a tiny real folder.

No test here asserts an accuracy level: accuracy is measured by `deer-reid eval`, not tested.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import asyncpg

import numpy as np
import pytest

from deer_reid.evaluation import calibration as cal
from deer_reid.evaluation.dataset import DatasetError, load_dataset
from deer_reid.evaluation.metrics import average_precision, bcubed, clustering_report, merges_and_splits, rank, \
    retrieval
from services.fusion.calibration import CalibrationSource
from shared.calibration_artifact import ArtifactError, install, load_file
from services.fusion.decision import Thresholds
from shared.config import Settings
from shared.db import _init_connection


# ---- metrics --------------------------------------------------------------------------------

def test_perfect_ranking_scores_one():
    ids = ["a", "a", "b", "b"]
    enc = ["1", "2", "3", "4"]
    sim = np.array([[1, .9, .1, .1], [.9, 1, .1, .1], [.1, .1, 1, .8], [.1, .1, .8, 1]])
    r = retrieval(sim, ids, enc)
    assert (r["queries"], r["top1"], r["top5"], r["mAP"]) == (4, 1.0, 1.0, 1.0)


def test_same_encounter_is_excluded_from_the_gallery():
    # image 1 only matches its own encounter twin: it is no query, but stays a distractor
    ids = ["a", "a", "b", "b", "b"]
    enc = ["e1", "e1", "e2", "e3", "e4"]
    sim = np.eye(5)
    r = retrieval(sim, ids, enc)
    assert r["queries"] == 3


def test_ties_rank_the_wrong_identity_first():
    assert rank(np.array([0.5, 0.5, 0.4]), np.array([True, False, False])).tolist() == [False, True, False]
    ids = ["a", "a", "b"]
    sim = np.ones((3, 3))  # a model that scores everything alike
    r = retrieval(sim, ids, ["1", "2", "3"])
    assert r["top1"] == 0.0 and r["queries"] == 2


def test_average_precision_by_hand():
    # relevant at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision(np.array([True, False, True])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([False, False])) == 0.0


def test_the_top1_interval_resamples_identities_and_narrows_with_more_of_them():
    from deer_reid.evaluation.metrics import bootstrap_interval

    # every identity right or every one wrong: no resample can move the share
    assert bootstrap_interval(np.ones(40, bool), [i // 4 for i in range(40)]) == [1.0, 1.0]
    # half the identities always right, half always wrong: the share moves with the identities drawn
    few = bootstrap_interval(np.repeat([True, False] * 5, 4), np.repeat(np.arange(10), 4))
    many = bootstrap_interval(np.repeat([True, False] * 50, 4), np.repeat(np.arange(100), 4))
    assert few[0] < many[0] < 0.5 < many[1] < few[1]
    # a retrieval reports it around its top-1
    sim = np.array([[1, .9, .1, .2], [.9, 1, .2, .1], [.1, .2, 1, .05], [.2, .1, .05, 1]])  # b: wrong
    r = retrieval(sim, ["a", "a", "b", "b"], [1, 2, 3, 4])
    assert r["top1"] == 0.5 and r["top1_ci95"][0] <= 0.5 <= r["top1_ci95"][1]


def test_bcubed_known_example():
    # predicted clusters {0,1,2} {3,4}; truth {0,1} {2,3,4}
    pred = ["x", "x", "x", "y", "y"]
    truth = ["A", "A", "B", "B", "B"]
    b = bcubed(pred, truth)
    # precision per item: 2/3, 2/3, 1/3, 1, 1 -> 11/15; recall: 1, 1, 1/3, 2/3, 2/3 -> 11/15
    assert b["precision"] == pytest.approx(11 / 15)
    assert b["recall"] == pytest.approx(11 / 15)
    assert b["f1"] == pytest.approx(11 / 15)


def _partitions(items: list) -> list[list[list]]:
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for p in _partitions(rest):
        out.append([[first], *p])
        out += [[*p[:k], [first, *p[k]], *p[k + 1:]] for k in range(len(p))]
    return out


def test_the_answers_floor_is_the_fewest_joins_of_any_grouping_that_reaches_the_f1():
    from itertools import product

    from deer_reid.evaluation.metrics import answers_floor

    # animal A: sightings of 3, 1, 1 and 2 photos; B: 2 and 1; C: one sighting of 2 (a photo's sighting is its unit)
    sizes = {"A": [3, 1, 1, 2], "B": [2, 1], "C": [2]}
    truth, sightings = [], []
    for animal, counts in sizes.items():
        for k, count in enumerate(counts):
            truth += [animal] * count
            sightings += [f"{animal}{k}"] * count
    targets = (0.6, 0.8, 0.9, 0.95, 1.0)
    floor = answers_floor(truth, sightings, targets)
    # every grouping of each animal's sightings (people join only one animal), by brute force
    fewest = {t: None for t in targets}
    for groups in product(*(_partitions(list(range(len(c)))) for c in sizes.values())):
        block = {}
        for animal, grouping in zip(sizes, groups):
            for b, members in enumerate(grouping):
                block.update({f"{animal}{k}": f"{animal}-{b}" for k in members})
        joins = sum(len(c) - len(g) for c, g in zip(sizes.values(), groups))
        f1 = bcubed([block[s] for s in sightings], truth)["f1"]
        for t in targets:
            if f1 >= t - 1e-12 and (fewest[t] is None or joins < fewest[t]):
                fewest[t] = joins
    assert floor == fewest and floor[1.0] == 4  # all joined: 3 + 1 + 0
    assert floor[0.6] == 0 < floor[0.8]  # the sightings apart: recall 0.484, F1 0.652
    assert answers_floor(truth, sightings, (1.01,)) == {1.01: None}  # no F1 above 1
    assert answers_floor([], [], (0.9,)) == {0.9: None}
    with pytest.raises(ValueError):
        answers_floor(["A"], [], (0.9,))


def test_merges_splits_and_review():
    pred = [1, 1, 2, None, 3]
    truth = ["A", "B", "B", "C", "C"]
    ms = merges_and_splits(pred, truth)
    assert ms["predicted_individuals"] == 3
    assert ms["false_merge_rate"] == pytest.approx(1 / 3)
    assert ms["false_merge_detection_rate"] == pytest.approx(2 / 4)
    assert ms["false_split_rate"] == pytest.approx(1 / 3)  # B is in 1 and 2
    report = clustering_report(pred, truth)
    assert report["review_rate"] == pytest.approx(1 / 5)
    assert report["true_individuals"] == 3


# ---- sequential simulation (fusion's decision code) -----------------------------------------

def test_simulation_founds_and_assigns_like_the_service():
    sim = np.array([[1, .95, .2, .2], [.95, 1, .2, .2], [.2, .2, 1, .7], [.2, .2, .7, 1]])
    placed = cal.simulate({"m": sim}, [0, 1, 2, 3], ["female"] * 4, Thresholds(match=0.9, new=0.5))
    assert placed[0] == placed[1] != placed[2]
    assert placed[3] is None  # 0.7: between new and match -> review


def test_simulation_never_puts_a_buck_with_a_doe():
    sim = np.ones((2, 2))
    placed = cal.simulate({"m": sim}, [0, 1], ["male", "female"], Thresholds(match=0.9, new=0.5))
    assert placed[0] != placed[1] and None not in placed


def test_threshold_choice_respects_the_false_merge_target():
    P = cal.OperatingPoint
    def rates(by_individual, by_detection, f1):
        return {"false_merge_rate": by_individual, "false_merge_detection_rate": by_detection, "bcubed_f1": f1}

    points = [P(0.5, 0.4, rates(0.3, 0.5, 0.9)),
              P(0.6, 0.5, rates(0.01, 0.4, 0.8)),  # one giant merge: few individuals, many detections
              P(0.7, 0.6, rates(0.01, 0.015, 0.6)),
              P(0.8, 0.6, rates(0.0, 0.0, 0.5))]
    chosen, met = cal.choose(points, 0.02)
    assert met and chosen.match == 0.7
    chosen, met = cal.choose(points[:1], 0.02)
    assert not met and chosen.match == 0.5


def test_a_review_cap_narrows_the_choice_but_never_loosens_the_merge_target():
    P = cal.OperatingPoint

    def rates(merge, review, f1):
        return {"false_merge_rate": merge, "false_merge_detection_rate": merge, "review_rate": review,
                "bcubed_f1": f1}

    points = [P(0.5, 0.4, rates(0.01, 0.6, 0.5)), P(0.6, 0.5, rates(0.01, 0.1, 0.4)),
              P(0.7, 0.7, rates(0.10, 0.0, 0.9))]
    assert cal.choose(points, 0.02)[0].match == 0.5
    assert cal.choose(points, 0.02, max_review=0.2)[0].match == 0.6
    # no point within the merge target meets the cap: the cap gives way, the merge target does not
    assert cal.choose(points[:1] + points[2:], 0.02, max_review=0.2)[0].match == 0.5


def _artifact(versions: dict, chosen=(0.85, 0.7)) -> dict:
    sims = {"body:m": np.array([[1, .9, .2], [.9, 1, .3], [.2, .3, 1]])}
    fusion = cal.fit_fusion(sims, [0, 1, 2], ["a", "a", "b"], ["1", "2", "3"])
    return cal.write_artifact(Path(tempfile.mkdtemp()) / "c.json", versions=versions, fusion=fusion,
                              chosen=cal.OperatingPoint(*chosen, {}), met_target=True, target=0.02, fit={},
                              held_out={})


async def test_calibration_artifact_applies_only_to_its_embedding_versions(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    await _init_connection(conn)
    try:
        default = Thresholds(match=0.8, new=0.6)
        source = CalibrationSource(default)
        await conn.execute("UPDATE calibrations SET active = false")
        await source.refresh(conn)
        assert source.for_versions({"m": "m:1"}) == (default, None)
        with pytest.raises(ArtifactError):
            await install(conn, {"kind": "something else"})
        installed = await install(conn, _artifact({"m": "m:1"}))
        await source.refresh(conn)
        assert source.id == installed
        thresholds, model = source.for_versions({"m": "m:1"})
        assert (thresholds.match, thresholds.new) == (0.85, 0.7) and model is not None
        assert source.for_versions({"m": "m:2"}) == (default, None)
        p = model.calibrations["body:m"]
        assert p(0.95) == pytest.approx(1.0) and p(0.05) == pytest.approx(0.0)
        # a newer fit replaces it without a restart
        newer = await install(conn, _artifact({"m": "m:1"}, chosen=(0.9, 0.8)))
        await source.refresh(conn)
        assert source.id == newer and source.for_versions({"m": "m:1"})[0].match == 0.9
    finally:
        await conn.execute("UPDATE calibrations SET active = false")
        await conn.close()


def _broken(change) -> dict:
    artifact = json.loads(json.dumps(_artifact({"m": "m:1"})))
    change(artifact)
    return artifact


@pytest.mark.parametrize("change, message", [
    (lambda a: a["thresholds"].update(new=0.9, match=0.5), "above match"),
    (lambda a: a["thresholds"].update(match=float("nan")), "number in"),
    (lambda a: a["thresholds"].update(match=1.7), "number in"),
    (lambda a: a["fusion"]["weights"].update({"body:m": float("nan")}), "finite"),
    (lambda a: a["fusion"]["calibrations"]["body:m"].update(x=[0.9, 0.1, 0.5]), "not sorted"),
    (lambda a: a["fusion"]["calibrations"]["body:m"].update(y=[0.5]), "equally long"),
    (lambda a: a["fusion"]["calibrations"]["body:m"].update(prior=0.0), "prior"),
    (lambda a: a["fusion"].pop("intercept"), "malformed"),
    (lambda a: a["fusion"]["weights"].update({"coat:pattern-xfeat": 1.0}), "no calibration for"),
    (lambda a: a.update(embedding_versions=[]), "embedding_versions"),
])
async def test_a_calibration_with_bad_values_is_refused_before_it_can_stall_fusion(pg_dsn, change, message):
    """Keys alone were checked: an artifact with new > match, NaN weights or unsorted knots was installed,
    then every decision of its embedding versions raised."""
    conn = await asyncpg.connect(pg_dsn)
    await _init_connection(conn)
    try:
        active = await conn.fetchval("SELECT count(*) FROM calibrations WHERE active")
        with pytest.raises(ArtifactError, match=message):
            await install(conn, _broken(change))
        assert await conn.fetchval("SELECT count(*) FROM calibrations WHERE active") == active
    finally:
        await conn.close()


# ---- the labelled folder ----------------------------------------------------------------------

@pytest.fixture
def tiny_folder(tmp_path, nyala_rows, nyala_paths):
    """Three identities with four real photos each, in a folder of the test's own (never in the repo)."""
    by_identity: dict[str, list] = {}
    for row, path in zip(nyala_rows, nyala_paths):
        by_identity.setdefault(row["identity"], []).append((row, path))
    chosen = [items[:4] for items in by_identity.values() if len(items) >= 4][:3]
    lines = ["path,identity,viewpoint,encounter"]
    for items in chosen:
        for row, path in items:
            rel = f"img/{row['identity']}_{path.name}"
            (tmp_path / "img").mkdir(exist_ok=True)
            shutil.copyfile(path, tmp_path / rel)
            lines.append(f"{rel},{row['identity']},{row['viewpoint']},{row['encounter']}")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    sexes = ["identity,sex"] + [f"{items[0][0]['identity']},{'male' if n == 0 else 'female'}"
                                for n, items in enumerate(chosen)]
    (tmp_path / "sex.csv").write_text("\n".join(sexes) + "\n")
    return tmp_path


def test_loo_refuses_a_folder_where_no_photo_can_be_a_query(tiny_folder, tmp_path, capsys):
    """All of an identity's photos in one encounter left every query without a positive: top-1 0.0,
    `queries: 0`, exit 0, as if measured."""
    from deer_reid.cli import main
    from deer_reid.evaluation.dataset import check_queryable

    meta = (tiny_folder / "metadata.csv").read_text().splitlines()
    one_encounter = [meta[0]] + [",".join(line.split(",")[:3] + [line.split(",")[1]]) for line in meta[1:]]
    (tiny_folder / "metadata.csv").write_text("\n".join(one_encounter) + "\n")
    assert main(["eval", str(tiny_folder), "--protocol", "loo", "--report", str(tmp_path / "r"), "--quiet"]) == 2
    assert "none of the 12 photos can be a query" in capsys.readouterr().err
    # fewer than half: the run goes on, and says so
    import dataclasses

    samples = load_dataset(tiny_folder)
    samples[0] = dataclasses.replace(samples[0], encounter="elsewhere")
    assert "only 4 of 12 photos can be queries" in check_queryable(samples)


def test_loo_protocol_on_a_tiny_real_folder(tiny_folder, tmp_path_factory):
    from deer_reid.evaluation.run import run_loo

    out = tmp_path_factory.mktemp("out")
    samples = load_dataset(tiny_folder)
    assert len(samples) == 12 and {s.cls.value for s in samples} == {"buck", "doe"}
    result = run_loo(tiny_folder, mode="fast", body_model="efficientnet_lite0", limit=None, seed=3,
                     report_dir=out / "report", json_path=out / "r.json", target_false_merge=0.02,
                     calibration_out=out / "cal.json", settings=Settings(), progress=False)
    enc = {}
    for s in samples:
        enc.setdefault(s.identity, set()).add(s.encounter)
    expected_queries = sum(1 for s in samples if len(enc[s.identity] - {s.encounter}) > 0)
    assert result["queries"] == expected_queries
    assert 0 <= result["top1"] <= result["top5"] <= 1 and 0 <= result["mAP"] <= 1
    assert result["weights_real"] is True
    saved = json.loads((out / "r.json").read_text())
    assert {"protocol", "mode", "queries", "top1", "top5", "mAP", "weights_real", "embedding_versions"} <= set(saved)
    assert (out / "report" / "report.md").read_text().startswith("# deer-reid evaluation: loo")
    for name in ("cmc.png", "scores.png", "calibration.png", "operating_curve.png"):
        assert (out / "report" / name).stat().st_size > 1000
    artifact = load_file(out / "cal.json")
    assert artifact["embedding_versions"] == result["embedding_versions"]
    assert artifact["thresholds"]["new"] <= artifact["thresholds"]["match"]
    assert set(artifact["fusion"]["calibrations"]) == {"body:efficientnet_lite0"}
    assert artifact["fusion"]["aggregation"] in ("best", "mean2")
    # the ablation and the before/after comparison are reported on the identities the fit never saw
    assert set(result["ablation"]) == {"body:efficientnet_lite0 alone",
                                       f"all fused through calibration ({artifact['fusion']['aggregation']})"}
    held = result["calibration"]["held_out"]
    assert result["calibration"]["before"]["held_out"]["true_individuals"] == held["report"]["true_individuals"]
    assert result["ablation_gallery"]["identities"] == held["identities"]

    # The open-set run reports only on identities the thresholds were not fitted on.
    from deer_reid.evaluation.run import held_out_of

    fitted = set(artifact["fit"]["identity_names"])
    assert fitted and fitted < {s.identity for s in samples}
    kept, note = held_out_of(samples, artifact)
    assert {s.identity for s in kept} == {s.identity for s in samples} - fitted
    assert [s.index for s in kept] == list(range(len(kept)))
    assert note["identities_excluded"] == len(fitted) and note["images_excluded"] == len(samples) - len(kept)
    assert held_out_of(samples, None)[0] == samples


def test_loo_with_coat_measures_the_other_pattern_matchers_as_candidates_outside_the_artifact(tiny_folder,
                                                                                             tmp_path_factory):
    from deer_reid.evaluation.run import run_loo

    out = tmp_path_factory.mktemp("coat-out")
    result = run_loo(tiny_folder, mode="fast", body_model="efficientnet_lite0", limit=None, seed=3,
                     report_dir=None, json_path=None, target_false_merge=0.02, calibration_out=out / "cal.json",
                     settings=Settings(coat_pattern_shortlist=2, coat_cascade_shortlist=1), progress=False, coat=True,
                     coat_shortlist=4)
    how = load_file(out / "cal.json")["fusion"]["aggregation"]
    candidates = {k for k in result["ablation"] if "candidate" in k}
    assert candidates == {
        f"all fused + xfeat-crop as a second pattern component (candidate, not in the service; {how})"}
    assert set(result["candidate_weights"]["xfeat-crop"]) == {
        "body:efficientnet_lite0", "coat:colour", "coat:markings", "coat:pattern-xfeat", "coat:pattern-rootsift",
        "coat:pattern-xfeat-crop"}
    assert candidates <= set(result["ablation_same_viewpoint"])
    assert result["coat"]["shortlist"] == 4 and result["coat"]["pattern_shortlist"] == 2
    assert "coat:pattern alone, rootsift-animal (shortlist 2 by body)" in result["ablation"]  # the matchers' own
    # the cascade (RootSIFT verifies the 1 of the 2 that XFeat matched best), against every pair matched
    assert f"all fused, every keypoint pair of the 2 (no cascade; {how})" in result["ablation"]
    cascade = result["coat_cascade"]
    assert (cascade["cascade_shortlist"], cascade["pattern_shortlist"]) == (1, 2)
    assert 0 <= cascade["same_decision"] <= 1 and 0 <= cascade["same_first_photo"] <= 1
    assert sum(cascade["decisions"]["cascade"].values()) == cascade["queries"] == \
        sum(cascade["decisions"]["every_pair"].values())
    # the artifact fusion installs holds only what the services compute: both of the service's matchers
    artifact = load_file(out / "cal.json")["fusion"]
    assert set(artifact["calibrations"]) == {
        "body:efficientnet_lite0", "coat:colour", "coat:markings", "coat:pattern-xfeat", "coat:pattern-rootsift"}
    defaults = Settings()  # the service's RootSIFT budget, as its version names it
    assert artifact["coat_version"].endswith(
        f"+rootsift-opencv-c{defaults.coat_sift_contrast}:{defaults.coat_sift_keypoints}-animal")


def test_loo_json_keeps_its_sections_in_order_through_the_cli(tmp_path, capsys):
    """A few whole identities of the real folder (`--limit`), with the coat: the JSON's sections, key for key
    and in order (report.md is written from them, and runs are compared by them), whatever the stages of
    run_loo become."""
    from deer_reid.cli import main
    from deer_reid.evaluation.coat import service_variants
    from tests.conftest import NYALA

    assert main(["eval", str(NYALA), "--protocol", "loo", "--limit", "16", "--coat", "--coat-shortlist", "4",
                 "--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "report"),
                 "--calibration-out", str(tmp_path / "cal.json"), "--quiet"]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["images"] == 16 and "_artifact" not in saved
    assert list(saved) == ["protocol", "mode", "data", "images", "true_individuals", "seed", "never_trained_on",
                           "body_models", "embedding_versions", "weights_real", "precision", "coat", "queries",
                           "top1", "top5", "mAP", "top1_ci95", "top5_ci95", "cmc", "same_viewpoint", "levers",
                           "candidate_weights", "ablation_gallery", "ablation", "ablation_same_viewpoint",
                           "calibration", "plots"]
    assert list(saved["coat"]) == ["shortlist", "pattern_shortlist", "cascade_shortlist", "pattern_components",
                                   "extraction_ms_median",
                                   "matching_s_all_variants", "flags", "facing_vs_viewpoint", "shortlist_drawn"]
    assert list(saved["levers"]) == ["sighting as the query (per sighting, not per image)",
                                     *(f"query expansion αQE k={k}" for k in (1, 2, 3))]
    calibration = saved["calibration"]
    how = calibration["aggregation"]
    # the coat's components: colour and markings, then the service's pattern matchers, named as it names them
    components = ["body:efficientnet_lite0", "coat:colour", "coat:markings", *service_variants(Settings()).values()]
    assert list(saved["ablation"]) == [
        *(f"{c} alone" for c in components),
        *(f"coat:pattern alone, {v} (shortlist 4 by body)" for v in ("xfeat-animal", "rootsift-animal", "xfeat-crop")),
        f"all fused through calibration ({how})",
        f"all fused + xfeat-crop as a second pattern component (candidate, not in the service; {how})"]
    assert list(saved["ablation_same_viewpoint"]) == [
        *(f"{c} alone" for c in components),
        *(f"coat:pattern alone, {v}" for v in ("xfeat-animal", "rootsift-animal", "xfeat-crop")),
        f"all fused through calibration ({how})",
        f"all fused + xfeat-crop as a second pattern component (candidate, not in the service; {how})"]
    assert list(saved["ablation"][f"all fused through calibration ({how})"]) == [
        "queries", "top1", "top5", "mAP", "top1_ci95", "top5_ci95"]
    assert list(calibration) == ["thresholds", "aggregation", "target_false_merge_rate", "target_met_on_fit",
                                 "max_review", "fusion_weights", "fusion_intercept", "fit", "held_out", "artifact",
                                 "by_aggregation", "before", "seconds"]
    assert list(calibration["fusion_weights"]) == components
    assert list(calibration["fit"]) == ["identities", "images", "report"]
    assert list(calibration["held_out"]) == ["identities", "images", "report", "with_sightings"]
    assert list(calibration["by_aggregation"]) == ["best", "mean2"]
    assert list(calibration["before"]) == ["fusion", "thresholds", "target_met_on_fit", "held_out"]
    assert saved["ablation_gallery"]["images"] == calibration["held_out"]["images"]
    assert list(saved["plots"]) == ["cmc", "scores", "calibration", "operating_curve"]
    assert list(load_file(tmp_path / "cal.json")["fusion"]["calibrations"]) == components


def test_coat_eval_measures_the_services_matchers_or_says_which_it_cannot():
    from deer_reid.evaluation.coat import service_variants

    assert service_variants(Settings()) == {"xfeat-animal": "coat:pattern-xfeat", "rootsift-animal": "coat:pattern-rootsift"}
    assert service_variants(Settings(coat_patterns="xfeat", coat_restrict_to_animal=False)) == {
        "xfeat-crop": "coat:pattern-xfeat"}
    with pytest.raises(ValueError, match=r"\['rootsift-crop'\]"):
        service_variants(Settings(coat_patterns="xfeat,rootsift", coat_restrict_to_animal=False))


def test_coat_scores_the_shortlist_and_gives_the_rest_its_floor_or_no_evidence():
    from deer_reid.evaluation.coat import as_fusion_scores

    nan = np.nan
    raw = np.array([[nan, 0.8, 0.3, 0.5],
                    [0.8, nan, nan, nan],
                    [0.3, nan, nan, 0.1],
                    [0.5, nan, 0.1, nan]])
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, [1, 2]] = True  # photo 0 compared with photos 1 and 2, not 3
    mask[1, [2]] = True  # nothing could be compared: no evidence at all
    mask[2, [0, 3]] = True
    out = as_fusion_scores(raw, mask)
    assert out[0, 1:].tolist() == [0.8, 0.3, 0.3]  # photo 3 is absent from the shortlist: the floor, not its 0.5
    assert np.isnan(out[1]).all()
    assert out[2, [0, 1, 3]].tolist() == [0.3, 0.1, 0.1]
    assert np.isnan(out[3]).all()  # an empty shortlist


@pytest.mark.parametrize("csv_text, sex_text, message", [
    ("identity\n1\n", None, "missing column(s) path"),
    ("path,identity\n", None, "no rows"),
    ("path,identity\nimg/none.jpg,1\n", None, "row 2: image 'img/none.jpg' not found"),
    ("path,identity\n../../etc/passwd,1\n", None, "leaves the data folder"),
    ("path,identity\nimg/a.jpg,\n", None, "row 2: empty path or identity"),
    ("path,identity\nimg/a.jpg,1\n", "identity,sex\n1,robot\n", "sex.csv row 2"),
    ("path,identity\nimg/a.jpg,1\n", "id,gender\n", "needs columns identity,sex"),
])
def test_bad_labelled_folders_name_the_problem(tmp_path, jpeg_bytes, csv_text, sex_text, message):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg_bytes)
    (tmp_path / "metadata.csv").write_text(csv_text)
    if sex_text is not None:
        (tmp_path / "sex.csv").write_text(sex_text)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(tmp_path)


def test_missing_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="metadata.csv: file not found"):
        load_dataset(tmp_path)


def test_a_sighting_query_takes_its_best_photo():
    from deer_reid.evaluation.metrics import retrieval_by_sighting

    # encounter e1 = images 0 (left flank) and 1 (right flank) of a; image 2 is a's other sighting,
    # image 3 is b. Only the right flank (1) matches a's other photo.
    ids, enc = ["a", "a", "a", "b"], ["e1", "e1", "e2", "e3"]
    sim = np.array([[1, .5, .2, .6], [.5, 1, .9, .3], [.2, .9, 1, .1], [.6, .3, .1, 1]])
    per_image = retrieval(sim, ids, enc)
    per_sighting = retrieval_by_sighting(sim, ids, enc)
    assert per_image["queries"] == 3 and per_image["top1"] == pytest.approx(2 / 3)  # image 0 ranks b first
    assert per_sighting["queries"] == 2 and per_sighting["top1"] == 1.0


def test_query_expansion_pulls_a_query_toward_its_neighbours_outside_its_encounter():
    from deer_reid.evaluation.metrics import query_expanded_similarity
    from services.fusion.rerank import expanded_query

    e = np.eye(3, dtype=np.float32)
    q = np.array([0.8, 0.6, 0], dtype=np.float32)
    assert np.allclose(expanded_query(q, e[:0]), q)  # nothing to expand with
    moved = expanded_query(q, e, k=1, alpha=1.0)
    assert moved @ e[0] > q @ e[0] and np.isclose(np.linalg.norm(moved), 1)
    vecs = np.array([[1, 0], [0.96, 0.28], [0.6, 0.8]], dtype=np.float32)
    s = query_expanded_similarity(vecs, ["x", "x", "y"], k=1)
    # row 0 may only expand with image 2 (image 1 shares its encounter)
    assert s[0, 2] > vecs[0] @ vecs[2]


def test_simulation_decides_a_sighting_together():
    # images 0 and 1 are one sighting of animal a (1 looks like nobody); 2 is a later photo of a.
    sim = np.array([[1, .1, .95], [.1, 1, .2], [.95, .2, 1]])
    t = Thresholds(match=0.9, new=0.5)
    alone = cal.simulate({"m": sim}, [0, 1, 2], ["female"] * 3, t)
    assert alone[1] != alone[0]  # on its own, the odd frame founds another individual
    together = cal.simulate({"m": sim}, [0, 1, 2], ["female"] * 3, t, sightings=["s1", "s1", "s2"])
    assert together[0] == together[1] == together[2]
    # the sighting also queries together: frame 1 arriving first is matched through frame 0's likeness
    sim2 = np.array([[1, .1, .95], [.1, 1, .2], [.95, .2, 1]])
    order = [2, 0, 1]
    joint = cal.simulate({"m": sim2}, order, ["female"] * 3, t, sightings=["s1", "s1", "s2"])
    assert joint[0] == joint[2] == joint[1]


def test_review_session_judges_suggestions_against_the_labels():
    from collections import Counter

    from deer_reid.evaluation.review_session import judge, right_individuals, summarize

    placements = {1: Counter({"a": 3, "b": 1}), 2: Counter({"b": 2}), 3: Counter({"a": 1, "c": 1}), 4: Counter()}
    assert right_individuals("a", placements) == {1, 3}  # a tie counts
    assert right_individuals("b", placements) == {2}
    assert right_individuals("z", placements) == set()
    assert judge([2, 3, 1], {1, 3}) == (2, "confirm", 1)
    assert judge([2, 4, 5, 1], {1}) == (None, "assign", 2)  # fourth suggestion: not on the page
    assert judge([2], set()) == (None, "new", 1)
    outcomes = [{"right_exists": True, "rank": 1, "action": "confirm", "clicks": 1, "candidates": [1]},
                {"right_exists": True, "rank": None, "action": "assign", "clicks": 2, "candidates": [2]},
                {"right_exists": False, "rank": None, "action": "new", "clicks": 1, "candidates": []}]
    s = summarize(outcomes)
    assert (s["top1_of_existing"], s["top3_of_existing"], s["right_individual_was_new"]) == (0.5, 0.5, 1)
    assert s["mean_actions_per_decision"] == round(4 / 3, 3) and s["fusion_had_no_candidate"] == 1


def test_coat_shortlists_are_drawn_as_fusion_draws_them_within_each_gallery_and_not_matched_again():
    from deer_reid.evaluation import coat as coat_eval

    rng = np.random.default_rng(0)
    v = rng.standard_normal((16, 4))
    body = v @ v.T
    enc = [i // 2 if i % 4 < 2 else 100 + i for i in range(16)]  # photos 0-1, 4-5, ...: one encounter each
    groups = [list(range(8)), list(range(8, 16))]
    whole = coat_eval.coat_shortlists(body, enc, Settings(), 3).mask
    halves = coat_eval.coat_shortlists(body, enc, Settings(), 3, groups).mask
    assert not halves[:8, 8:].any() and not halves[8:, :8].any()  # never across the two galleries
    for i in range(16):
        # its three closest photos by body in its half, never one of its own encounter (not in its gallery)
        others = [j for j in groups[i >= 8] if enc[j] != enc[i]]
        assert sorted(np.flatnonzero(halves[i]).tolist()) == sorted(sorted(others, key=lambda j: -body[i, j])[:3])
    assert (whole != halves).any()
    # scores already matched are reused: a `known` pair comes back as given, not matched again
    known = np.full((16, 16), np.nan)
    known[halves] = 0.5
    no_patterns = coat_eval.coat_views([{"embeddings": {}, "attributes": {}, "xfeat-animal": None}] * 16, "xfeat-animal")
    out = coat_eval.pair_matrix("coat:pattern-xfeat", no_patterns, halves, known)  # nothing new could be scored
    assert np.array_equal(np.isnan(out), ~halves) and np.all(out[halves] == 0.5)


# ---- the keypoint-budget curve ------------------------------------------------------------------

def test_keypoint_budgets_parse_or_name_the_bad_part():
    from deer_reid.evaluation.keypoints import parse_budgets

    assert parse_budgets("700, 3000:0.01") == [(700, 0.04), (3000, 0.01)]
    for bad in ("", "many", "3000:x", "3:0.01", "3000:0.5"):
        with pytest.raises(ValueError, match="budget"):
            parse_budgets(bad)


def test_a_pattern_re_ranks_its_shortlist_and_keeps_the_body_order_without_one(nyala_paths):
    from PIL import Image

    from deer_reid.evaluation.keypoints import hits, rerank_by_pattern
    from services.coat.pattern import PatternExtractor

    extract = PatternExtractor("rootsift", 800, 0.01)
    photos = [extract(np.array(Image.open(p).convert("RGB"))) for p in nyala_paths[:3]]
    patterns = [photos[0], photos[1], photos[0], None]  # photo 2 is photo 0 again; photo 3 has no pattern
    candidates = [np.array([1, 3, 2]), np.array([0, 2]), np.array([1, 0]), np.array([2, 1, 0])]
    ranked, per_pair = rerank_by_pattern(patterns, candidates)
    assert ranked[0].tolist() == [2, 1, 3]  # its own copy first, the photo without a pattern last
    assert ranked[2][0] == 0 and ranked[3].tolist() == [2, 1, 0] and per_pair > 0
    identities = ["a", "b", "a", "c"]
    assert hits(ranked, identities, [0, 2], 1).tolist() == [True, True]
    assert hits(candidates, identities, [0, 2], 1).tolist() == [False, False]


def test_the_keypoint_curve_through_the_cli(tmp_path, capsys):
    """A few whole identities of the real folder: one row per budget, a lower contrast finding more keypoints,
    the JSON and report.md written."""
    from deer_reid.cli import main
    from tests.conftest import NYALA

    assert main(["eval", str(NYALA), "--protocol", "keypoints", "--limit", "40", "--budgets", "200,1200:0.01",
                 "--coat-shortlist", "8", "--json", str(tmp_path / "k.json"), "--report", str(tmp_path / "report"),
                 "--quiet"]) == 0
    saved = json.loads((tmp_path / "k.json").read_text())
    assert saved["matcher"] == "rootsift" and saved["half"] == "fit" and saved["shortlist"] == 8
    low, high = saved["curve"]
    assert (low["keypoints"], low["contrast"], high["keypoints"], high["contrast"]) == (200, 0.04, 1200, 0.01)
    assert high["found_per_photo"] > low["found_per_photo"] > 0
    for row in (low, high):
        assert 0 <= row["top1"] <= row["top5"] <= 1 and row["match_ms_per_pair"] > 0 and row["extract_ms"] > 0
        assert row["ms_per_detection"] >= row["extract_ms"]
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| 200 | 0.04 |" in table and "| 1200 | 0.01 |" in table
