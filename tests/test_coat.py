"""Coat features on small real crops from nyala-train: foreground, colour, markings, pattern, bad input."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from services.coat import colour, markings, pattern
from services.coat.extractor import CoatExtractor
from services.coat.foreground import foreground
from shared import coat as coat_features
from shared.coat import COLOUR_VERSION, GREY_VERSION, MARKINGS_VERSION
from services.fusion.scoring import shortlist_scores
from shared.components import component, reading
from shared.components.coat import COAT, COLOUR, MARKINGS, PATTERN, PATTERN_OF


def coat_scores(query: dict, exemplar: dict) -> dict:
    """One pair's raw scores as fusion computes them: every coat component against a one-photo shortlist."""
    scored = shortlist_scores(reading(COAT), query, [(0, exemplar)])
    return {name: (by_individual[0][0] if by_individual[0] else None) for name, by_individual in scored.items()}


def small(path, side=256) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        return np.array(im)


def jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=92)
    return out.getvalue()


@pytest.fixture(scope="module")
def crops(nyala_paths) -> list[np.ndarray]:
    return [small(p) for p in nyala_paths[:6]]


@pytest.fixture(scope="module")
def extractor() -> CoatExtractor:
    return CoatExtractor()


def test_the_foreground_covers_the_animal_not_the_border(crops):
    for rgb in crops[:3]:
        fg = foreground(rgb)
        assert fg.found and 0.05 <= fg.fraction <= 0.97
        h, w = fg.mask.shape
        centre = fg.mask[h // 3: 2 * h // 3, w // 3: 2 * w // 3].mean()
        border = np.concatenate([fg.mask[:4].ravel(), fg.mask[-4:].ravel(), fg.mask[:, :4].ravel(),
                                 fg.mask[:, -4:].ravel()]).mean()
        assert centre > border


def test_a_crop_gets_the_same_foreground_whatever_its_worker_did_before(nyala_paths):
    """GrabCut draws from OpenCV's random generator: the mask must not depend on the generator's state."""
    for path in nyala_paths[:8]:
        rgb = small(path)
        masks = []
        for state in (1, 12345):
            cv2.setRNGSeed(state)
            masks.append(foreground(rgb).mask)
        assert np.array_equal(*masks)


def test_colour_histograms_are_192_d_per_region_and_channel_sums_to_one(crops):
    rgb = crops[0]
    fg = foreground(rgb)
    regions = colour.region_boxes(fg.box, colour.facing_left(fg.mask, fg.box))
    assert set(regions) == set(coat_features.REGIONS)
    hist = colour.colour_histograms(colour.normalise_illumination(rgb), fg.mask, regions)
    assert hist.shape == (192,)
    per_channel = hist.reshape(4, 3, 16).sum(-1)
    seen = per_channel.sum(1) > 0
    assert seen.sum() >= 3 and np.allclose(per_channel[seen], 1.0, atol=1e-5)


def test_illumination_normalisation_keeps_colour_similar_under_a_light_change(crops):
    rgb = crops[1]
    fg = foreground(rgb)
    regions = colour.region_boxes(fg.box, True)

    def hist(x):
        return colour.colour_histograms(colour.normalise_illumination(x), fg.mask, regions)

    darker = np.array(ImageEnhance.Brightness(Image.fromarray(rgb)).enhance(0.6))
    warmer = np.clip(rgb.astype(np.int16) * np.array([1.25, 1.0, 0.8]), 0, 255).astype(np.uint8)
    reddened = rgb.copy()
    reddened[fg.mask > 0] = np.clip(reddened[fg.mask > 0].astype(np.int16) * np.array([1.9, 0.7, 0.5]), 0, 255)
    base = hist(rgb)
    assert coat_features.colour_similarity(base, base) == pytest.approx(1.0)
    assert coat_features.colour_similarity(base, hist(darker)) > 0.85
    assert coat_features.colour_similarity(base, hist(warmer)) > 0.85  # the light's colour, removed by grey-world
    # the animal's own colour changing (a rufous coat against a dark one) is not tolerated
    assert coat_features.colour_similarity(base, hist(reddened)) < coat_features.colour_similarity(base, hist(warmer)) - 0.1


def test_a_grey_infrared_frame_is_flagged_and_never_compared_with_day_colour(crops, extractor):
    rgb = crops[2]
    grey = np.repeat(np.array(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2)
    assert coat_features.is_infrared(grey) and not coat_features.is_infrared(rgb)
    day, night = extractor.extract(jpeg(rgb)), extractor.extract(jpeg(grey))
    assert "infrared" in night.flags and night.attributes["lighting"] == "infrared"
    assert [e.version for e in night.embeddings if e.model != "coat-markings"] == [GREY_VERSION]
    assert [e.version for e in day.embeddings if e.model != "coat-markings"] == [COLOUR_VERSION]
    vectors = {r: next(e.array() for e in x.embeddings if e.version in (COLOUR_VERSION, GREY_VERSION))
               for r, x in (("day", day), ("night", night))}
    scores = coat_scores({"colour": (COLOUR_VERSION, vectors["day"])}, {"colour": (GREY_VERSION, vectors["night"])})
    assert scores[COLOUR] is None
    assert np.isnan(component(COLOUR).similarity([{"colour": None}], [{"colour": (COLOUR_VERSION, vectors["day"])}])[0, 0])


def test_a_painted_white_patch_is_found_where_it_was_painted(crops):
    rgb = crops[3].copy()
    fg = foreground(rgb)
    x0, y0, x1, y1 = fg.box
    cx, cy = x0 + (x1 - x0) // 2, y0 + (y1 - y0) // 2
    rgb[cy - 6:cy + 6, cx - 6:cx + 6] = 0
    before = {(round(m.x, 1), round(m.y, 1)) for m in markings.find_markings(rgb, fg.mask, fg.box, True) if m.bright}
    rgb[cy - 5:cy + 5, cx - 5:cx + 5] = 255  # a white patch inside a dark ring: far brighter than around it
    found = markings.find_markings(rgb, fg.mask, fg.box, True)
    patches = [m for m in found if m.bright and abs(m.x - 0.5) < 0.08 and abs(m.y - 0.5) < 0.08]
    assert patches, f"no white marking at the painted spot; found {[(m.kind, m.x, m.y) for m in found][:10]}"
    assert patches[0].region == "flanks" and (round(patches[0].x, 1), round(patches[0].y, 1)) not in before
    record = patches[0].as_dict()
    assert set(record) >= {"kind", "x", "y", "width", "height", "area", "region"}


def test_facial_markings_weigh_double_in_frontal_views():
    face = markings.Marking("facial-blaze", 0.1, 0.1, 0.05, 0.1, 0.01, 0.0, "face", True)
    flank = markings.Marking("white-patch", 0.5, 0.5, 0.05, 0.05, 0.01, 0.0, "flanks", True)
    side, frontal = markings.marking_map([face, flank]), markings.marking_map([face, flank], frontal=True)
    assert side.shape == (markings.MAP_DIM,)
    assert side.max() == pytest.approx(side[side > 0].min())  # equal weights in a side view
    assert frontal.max() == pytest.approx(2 * frontal[frontal > 0].min())
    # maps of animals facing different ways are never compared
    views = [{"markings": side, "facing": "left"}, {"markings": side, "facing": "right"}]
    m = component(MARKINGS).similarity(views, views)
    assert np.isnan(m[0, 1]) and m[0, 0] == pytest.approx(1.0)


def test_regions_follow_confident_keypoints_and_fall_back_without_them():
    kp = np.zeros((17, 3))
    kp[:, 2] = 0.9
    kp[[0, 1, 2]] = [[20, 20, 0.9], [24, 20, 0.9], [10, 30, 0.9]]  # eyes, nose
    kp[3] = [40, 40, 0.9]  # neck
    kp[[5, 8]] = [[60, 50, 0.9], [62, 52, 0.9]]  # shoulders
    kp[[11, 14]] = [[150, 50, 0.9], [152, 52, 0.9]]  # hips
    kp[[6, 9, 12, 15]] = [[60, 80, 0.9], [62, 80, 0.9], [150, 80, 0.9], [152, 80, 0.9]]
    kp[[7, 10, 13, 16]] = [[60, 110, 0.9], [62, 110, 0.9], [150, 110, 0.9], [152, 110, 0.9]]
    regions = colour.regions_from_keypoints(kp.tolist(), (120, 200))
    fx0, fy0, fx1, fy1 = regions["flanks"]
    assert fx0 < 60 and fx1 > 152 and fy0 <= 50 and fy1 >= 52
    assert regions["face"][0] <= 10 and regions["face"][2] <= 40
    kp[[5, 8], 2] = 0.3  # shoulders below the SPEC's 0.6: not placed from pose
    assert colour.regions_from_keypoints(kp.tolist(), (120, 200)) is None


def test_pattern_packs_compactly_and_matches_the_same_animal_better_than_another(nyala_rows, nyala_paths):
    extract = pattern.PatternExtractor("xfeat", 256)
    rgb = small(nyala_paths[0], 512)
    p = extract(rgb)
    raw = coat_features.pack(p)
    assert len(raw) == 8 + len(p) * 68 and len(p) == 256
    back = coat_features.unpack(raw)
    assert np.abs(back.points - p.points).max() < 1e-4 and (back.descriptors * p.descriptors).sum(1).min() > 0.99
    h, w = rgb.shape[:2]
    shifted = extract(np.ascontiguousarray(rgb[h // 30:, w // 30:]))  # the same photo, re-framed
    other_identity = next(i for i, r in enumerate(nyala_rows) if r["identity"] != nyala_rows[0]["identity"])
    other = extract(small(nyala_paths[other_identity], 512))
    same, different = coat_features.inliers(p, shifted), coat_features.inliers(p, other)
    assert same > 3 * max(different, 5)
    assert 0 <= coat_features.pattern_score(different) < coat_features.pattern_score(same) < 1
    with pytest.raises(coat_features.PatternError):
        coat_features.unpack(raw[:-3])


def _mutual_by_argmax(sims):
    forward, backward = sims.argmax(1), sims.argmax(0)
    rows = np.nonzero(backward[forward] == np.arange(len(forward)))[0]
    return rows, forward[rows]


def test_mutual_nearest_neighbours_are_argmax_both_ways_ties_included(nyala_paths):
    rng = np.random.default_rng(3)
    for n, m in [(300, 200), (40, 500), (1, 7), (9, 1)]:
        sims = rng.standard_normal((n, m)).astype(np.float32)
        for got, want in zip(coat_features.mutual_nearest(sims), _mutual_by_argmax(sims)):
            np.testing.assert_array_equal(got, want)
    tied = np.array([[5, 5, 0], [5, 1, 0], [0, 0, 3], [0, 0, 3]], np.float32)  # ties along rows and columns
    for got, want in zip(coat_features.mutual_nearest(tied), _mutual_by_argmax(tied)):
        np.testing.assert_array_equal(got, want)
    a, b = (pattern.PatternExtractor("rootsift", 1500, 0.01)(small(path, 512)) for path in nyala_paths[:2])
    sims = a.descriptors @ b.descriptors.T  # real descriptors: the matches the homography is fitted to
    for got, want in zip(coat_features.mutual_nearest(sims), _mutual_by_argmax(sims)):
        np.testing.assert_array_equal(got, want)


def test_mutual_matches_made_in_blocks_are_those_of_the_whole_matrix(nyala_paths):
    rgbs = [small(path, 512) for path in nyala_paths[:3]]
    for extract in (pattern.PatternExtractor("rootsift", 1500, 0.01), pattern.PatternExtractor("xfeat", 512)):
        a, b, c = (extract(rgb) for rgb in rgbs)
        for x, y in ((a, b), (b, c), (c, a)):
            want = coat_features.mutual_nearest(coat_features.similarities(x, y))
            assert len(want[0]) >= 10
            for block in (1, len(y), 7 * len(y) + 3, coat_features.BLOCK_FLOATS, 10 ** 9):  # a row to all at once
                for got, expected in zip(coat_features.mutual_matches(x, y, block), want):
                    np.testing.assert_array_equal(got, expected)
    one = coat_features.Pattern(a.kind, a.points[:1], a.codes[:1])  # a single keypoint
    for got, expected in zip(coat_features.mutual_matches(one, b), coat_features.mutual_nearest(
            coat_features.similarities(one, b))):
        np.testing.assert_array_equal(got, expected)


def _as_products(a, b) -> np.ndarray:
    """The similarities of two patterns scaled back to their codes' dot products (float64, unrounded)."""
    return coat_features.similarities(a, b).astype(np.float64) * np.outer(a.norms, b.norms)


def test_patterns_match_on_their_stored_codes_with_exact_integer_products(nyala_paths):
    rgbs = [small(path, 512) for path in nyala_paths[:2]]
    for extract in (pattern.PatternExtractor("rootsift", 1500, 0.01), pattern.PatternExtractor("xfeat", 512)):
        a, b = (extract(rgb) for rgb in rgbs)
        back = coat_features.unpack(coat_features.pack(a))
        np.testing.assert_array_equal(back.codes, a.codes)  # a fresh pattern and its stored copy are one pattern
        assert coat_features.inliers(back, b) == coat_features.inliers(a, b)
        sims = coat_features.similarities(a, b)
        assert sims.dtype == np.float32 and sims.shape == (len(a), len(b))
        # the dot products were accumulated exactly: scaled back, each is its integer within rounding
        products = _as_products(a, b)
        exact = a.codes.astype(np.int64) @ b.codes.T.astype(np.int64)
        assert np.abs(products - exact).max() < 0.5  # rounds to the right integer
        cosine = a.descriptors.astype(np.float64) @ b.descriptors.T.astype(np.float64)
        np.testing.assert_allclose(sims, cosine, atol=2e-6)
    extreme = coat_features.Pattern("rsf1", np.zeros((2, 2), np.float32),
                                    np.array([[127] * 128, [-127] * 128], np.int8))  # the largest sums there are
    np.testing.assert_allclose(_as_products(extreme, extreme), [[127 * 127 * 128, -127 * 127 * 128],
                                                                [-127 * 127 * 128, 127 * 127 * 128]], atol=0.5)


def test_the_pattern_cache_keeps_the_most_recently_used_within_its_budget():
    def made(n: int) -> coat_features.Pattern:
        return coat_features.Pattern("rsf1", np.zeros((n, 2), np.float32), np.ones((n, 128), np.int8))

    size = coat_features.PatternCache.size_of(made(100))
    cache = coat_features.PatternCache(3 * size)
    for k in "abc":
        cache.put(k, "v1", made(100))
    assert cache.used == 3 * size and sorted(cache.holding("abc")) == ["a", "b", "c"]
    cache.holding(["a"])  # used: "b" is now the least recently used
    cache.put("d", "v1", made(100))
    assert sorted(cache.holding("abcd")) == ["a", "c", "d"] and cache.used == 3 * size
    version, held = cache.holding(["a"])["a"]
    assert version == "v1" and len(held) == 100
    cache.put("a", "v2", made(50))  # a key put again replaces its entry, counted once
    assert cache.holding(["a"])["a"][0] == "v2" and cache.used == 2 * size + cache.size_of(made(50))
    huge = made(400)  # larger than the whole budget: returned, never held, nothing evicted for it
    assert cache.put("e", "v1", huge) is huge and "e" not in cache.holding(["e"]) and len(cache) == 3
    assert len(coat_features.PatternCache(0).put("f", "v1", made(10))) == 10
    # a cached pattern and its packed bytes are matched alike
    assert coat_features.as_pattern(huge) is huge
    np.testing.assert_array_equal(coat_features.as_pattern(coat_features.pack(huge)).codes, huge.codes)


def test_rootsift_is_the_measured_alternative(nyala_paths):
    p = pattern.PatternExtractor("rootsift", 128)(small(nyala_paths[0], 384))
    assert p.kind == "rsf1" and 20 <= len(p) <= 128 and p.descriptors.shape[1] == 128
    assert coat_features.unpack(coat_features.pack(p)).descriptors.shape == p.descriptors.shape


def test_rootsift_finds_more_on_the_animal_at_a_lower_contrast_and_says_so_in_its_version(nyala_paths):
    rgb = small(nyala_paths[0], 512)
    default, detailed = pattern.PatternExtractor("rootsift", 3000), pattern.PatternExtractor("rootsift", 3000, 0.01)
    assert len(detailed(rgb)) > 1.5 * len(default(rgb))
    assert default.version == "rootsift-opencv:3000" and detailed.version == "rootsift-opencv-c0.01:3000"


def test_rootsift_on_the_animal_looks_only_at_the_animals_box_and_finds_what_the_whole_crop_gives(nyala_paths):
    # SIFT is given the mask's box (grid-aligned, with a margin) instead of the whole crop: the keypoints must
    # be the ones SIFT finds on the whole crop under the same mask. At a budget that binds they need not be:
    # OpenCV keeps the budget's best before it applies the mask, so the crop's background competes less
    for path in nyala_paths[:3]:
        rgb = small(path, 512)
        h, w = rgb.shape[:2]
        mask = foreground(rgb).mask
        x0, y0, x1, y1 = pattern.sift_window(mask, w, h)
        assert (x1 - x0) * (y1 - y0) <= w * h and mask[:y0].sum() == mask[y1:].sum() == 0
        assert x0 % pattern.SIFT_GRID == 0 and y0 % pattern.SIFT_GRID == 0
        got = pattern.PatternExtractor("rootsift", 8000, 0.002)(rgb, mask)  # the service's: it does not bind
        sift = cv2.SIFT_create(nfeatures=8000, contrastThreshold=0.002)
        found, _ = sift.detectAndCompute(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (mask > 0).astype(np.uint8) * 255)
        whole = np.array([(k.pt[0] / w, k.pt[1] / h) for k in found], np.float32)
        assert abs(len(got) - len(whole)) <= 0.02 * len(whole), (len(got), len(whole))
        # each keypoint at the same place (within the stored positions' rounding)
        gap = np.abs(got.points[:, None, :] - whole[None]).sum(-1)
        assert (gap.min(1) < 1e-3).mean() >= 0.98 and (gap.min(0) < 1e-3).mean() >= 0.98
    assert pattern.sift_window(np.zeros((50, 60), np.uint8), 60, 50) == (0, 0, 60, 50)


@pytest.mark.parametrize("name, image, flag", [
    ("tiny", np.full((20, 90, 3), 120, np.uint8), "tiny-crop"),
    ("black", np.zeros((120, 160, 3), np.uint8), "no-animal-found"),
    ("uniform", np.full((120, 160, 3), 180, np.uint8), "no-animal-found"),
])
def test_bad_crops_give_no_coat_evidence_flagged_never_an_error(extractor, name, image, flag):
    result = extractor.extract(jpeg(image))
    assert result.status == "no-evidence" and flag in result.flags
    assert not result.patterns and not result.embeddings


def test_unreadable_and_oversized_crops_give_no_evidence(extractor):
    assert extractor.extract(b"not a jpeg").flags == ["unreadable-crop"]
    huge = io.BytesIO()
    Image.new("L", (5000, 40)).save(huge, format="PNG")
    assert extractor.extract(huge.getvalue()).flags[0].startswith("oversized-crop")


def test_a_real_crop_gives_every_part_and_scores_itself_highest(crops, extractor):
    results = [extractor.extract(jpeg(c)) for c in crops]
    # facing is published only where the segmentation found the animal (not the box-prior ellipse)
    assert all(("facing" in r.attributes) != ("foreground-approximate" in r.flags) for r in results)
    a = next(r for r in results if "facing" in r.attributes)
    b = next(r for r in results if r is not a)
    assert a.status == "ok" and set(a.patterns) == {"xfeat", "rootsift"} and a.attributes["facing"] in ("left", "right")
    versions = {e.version for e in a.embeddings}
    assert COLOUR_VERSION in versions and MARKINGS_VERSION in versions

    def view(x):
        vectors = {e.version: e.array() for e in x.embeddings}
        return {"colour": (COLOUR_VERSION, vectors[COLOUR_VERSION]), "markings": vectors.get(MARKINGS_VERSION),
                "facing": x.attributes.get("facing"),
                "patterns": {m: (x.pattern_versions[m], raw) for m, raw in x.patterns.items()}}

    itself, other = coat_scores(view(a), view(a)), coat_scores(view(a), view(b))
    assert itself[COLOUR] == pytest.approx(1.0) and itself[MARKINGS] == pytest.approx(1.0)
    for matcher, name in PATTERN_OF.items():  # each matcher is a component of its own
        assert itself[name] > 0.9 and (other[name] or 0.0) < itself[name]
    # another extractor's keypoints (another version) are never compared: no evidence, not a low score
    renamed = {**view(a), "patterns": {m: ("other-version", raw) for m, (_, raw) in view(a)["patterns"].items()}}
    assert coat_scores(view(a), renamed)[PATTERN] is None
    # a matcher only the exemplar has gives no component; one only the query has, no evidence
    xfeat_only = {**view(a), "patterns": {"xfeat": view(a)["patterns"]["xfeat"]}}
    assert PATTERN_OF["rootsift"] not in coat_scores(xfeat_only, view(a))
    assert coat_scores(view(a), xfeat_only)[PATTERN_OF["rootsift"]] is None
