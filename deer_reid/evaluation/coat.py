"""Coat components for `deer-reid eval`: the coat service's own extractor on every photo, then the same
pairwise scores fusion computes (colour, markings, pattern), as similarity matrices.

As in the service, coat is scored against a shortlist only: each photo against the gallery photos its body
embedding finds closest (`shortlists`); the others take the lowest score of the query's shortlist (fusion's
rule for individuals absent from a component's shortlist). Extraction is cached by image checksum and extractor
version, like the body embeddings.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from deer_reid.evaluation.dataset import Sample
from deer_reid.evaluation.features import pipeline_crop
from services.coat.extractor import CoatExtractor
from shared.coat import pack
from shared.components import component, narrowed, reading
from shared.components.coat import COAT, PATTERN_OF, view_of
from shared.config import Settings

# The pattern variants measured: XFeat and RootSIFT on the animal (the service's two matchers by default),
# and XFeat on the whole crop. Each photo's animal is found once and every variant uses that foreground.
VARIANTS = {"xfeat-animal": ("xfeat", True), "rootsift-animal": ("rootsift", True), "xfeat-crop": ("xfeat", False)}
_ON_THE_ANIMAL = tuple(PATTERN_OF)  # every matcher fusion knows, extracted as the service does; the rest is added


def service_variants(settings: Settings) -> dict[str, str]:
    """{variant: the fusion component it is} for the service's matchers under `settings`."""
    where = "animal" if settings.coat_restrict_to_animal else "crop"
    service = {f"{m}-{where}": PATTERN_OF[m] for m in settings.coat_pattern_methods}
    unmeasured = sorted(set(service) - set(VARIANTS))
    if unmeasured:
        raise ValueError(f"eval --coat measures the pattern variants {sorted(VARIANTS)}; the service's settings ask "
                         f"for {unmeasured} (DEER_COAT_PATTERNS, DEER_COAT_RESTRICT_TO_ANIMAL)")
    return service


def _extract(args: tuple[bytes, tuple]) -> dict:
    """The service's coat features of one crop (both matchers on the animal), and the other pattern variants
    on the same foreground, each matcher with the service's budget."""
    crop, budgets = args
    extractor = _extractor(budgets)
    result = extractor.extract(crop)
    out: dict = {f"{m}-animal": result.patterns.get(m) for m in _ON_THE_ANIMAL}
    out.update({"embeddings": {e.version: e.array().copy() for e in result.embeddings},
                "attributes": result.attributes, "flags": result.flags, "timings": result.timings_ms})
    rgb = np.array(Image.open(io.BytesIO(crop)).convert("RGB"))
    for name, (method, restrict) in VARIANTS.items():
        if name not in out:
            if restrict and result.mask is None:
                out[name] = None
                continue
            found = extractor.patterns[method](rgb, result.mask if restrict else None)
            out[name] = pack(found) if len(found) >= 5 else None
    return out


_CACHE: dict = {}


def _budgets(settings: Settings) -> tuple[int, int, float]:
    """The service's pattern budgets under `settings`: XFeat's keypoints, RootSIFT's, SIFT's contrast."""
    return settings.coat_keypoints, settings.coat_sift_keypoints, settings.coat_sift_contrast


def _extractor(budgets: tuple[int, int, float]) -> CoatExtractor:
    if budgets not in _CACHE:
        keypoints, sift_keypoints, sift_contrast = budgets
        _CACHE[budgets] = CoatExtractor(_ON_THE_ANIMAL, keypoints, True, sift_keypoints, sift_contrast)
    return _CACHE[budgets]


def coat_version(settings: Settings) -> str:
    """The version of the service's coat extractor under `settings` (what an artifact's coat calibrations fit)."""
    return CoatExtractor.from_settings(settings).version


def coat_features(samples: Sequence[Sample], settings: Settings, *, cache: Path | None = None,
                  progress: bool = True) -> list[dict]:
    """The coat features of each sample (the service's extractor on the pipeline's crop), cached."""
    budgets = _budgets(settings)
    cache = cache or settings.model_cache.parent / "features"
    cache.mkdir(parents=True, exist_ok=True)
    versions = _extractor(budgets).version + "|" + ",".join(VARIANTS)
    file = cache / f"coat_{hashlib.sha256(versions.encode()).hexdigest()[:12]}_crop{settings.crop_max_side}.pkl"
    known: dict = pickle.loads(file.read_bytes()) if file.exists() else {}
    shas = [hashlib.sha256(s.path.read_bytes()).hexdigest() for s in samples]
    todo = [i for i, sha in enumerate(shas) if sha not in known]
    if todo:
        workers = max(1, min(len(todo) // 8, len(os.sched_getaffinity(0))))
        crops = ((pipeline_crop(samples[i].path.read_bytes(), settings), budgets) for i in todo)
        with ProcessPoolExecutor(workers) as pool:
            for i, feats in tqdm(zip(todo, pool.map(_extract, crops, chunksize=4)), total=len(todo),
                                 desc="coat features", unit="img", disable=not progress):
                known[shas[i]] = feats
        file.write_bytes(pickle.dumps(known))
    return [known[sha] for sha in shas]


def _scored_rows(args: tuple[str, list, list[tuple[int, list[int]]]]) -> list[tuple[int, int, float]]:
    name, items, work = args
    scorer = component(name)
    out = []
    for i, js in work:
        if js and scorer.applies(items[i]):
            row = scorer.similarity([items[i]], [items[j] for j in js])[0]
            out.extend((i, j, float(x)) for j, x in zip(js, row) if not np.isnan(x))
    return out


def closest(body: np.ndarray, encounters: Sequence, k: int, galleries: Sequence[Sequence[int]] | None = None
            ) -> list[np.ndarray]:
    """Each photo's `k` closest gallery photos by the body similarity `body` (N x N), closest first (ties in
    index order), as fusion picks its coat shortlist. Photos of the query's own encounter are never picked:
    the leave-one-encounter-out gallery does not hold them. With `galleries` (groups of photo indexes) each
    photo is shortlisted within its own group only: fusion shortlists among the gallery it searches, so a
    part of the run reported on its own (the held-out identities) must not spend its shortlist on photos
    outside it."""
    n = len(body)
    enc = np.asarray([str(e) for e in encounters], dtype=object)
    out: list[np.ndarray] = [np.zeros(0, np.int64)] * n
    for group in (galleries if galleries is not None else [range(n)]):
        ix = np.asarray(list(group), dtype=np.int64)
        sims = np.where(enc[ix][:, None] == enc[ix][None, :], -np.inf, body[np.ix_(ix, ix)])
        ranked = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        for r, row in enumerate(ranked):
            out[ix[r]] = ix[row[np.isfinite(sims[r, row])]]
    return out


def _as_mask(ranked: Sequence[np.ndarray], k: int) -> np.ndarray:
    """(N, N) bool: row i holds the first `k` of photo i's ranked photos."""
    mask = np.zeros((len(ranked), len(ranked)), dtype=bool)
    for i, row in enumerate(ranked):
        mask[i, row[:k]] = True
    return mask


class CoatShortlists(NamedTuple):
    mask: np.ndarray  # (N, N) bool: the photos every coat component compares
    pattern_mask: np.ndarray  # (N, N) bool: the first of them, which the keypoint matchers compare
    ranked: list[np.ndarray]  # each photo's shortlist, closest by body first (the cascade's tie order)


def coat_shortlists(body: np.ndarray, encounters: Sequence, settings: Settings, shortlist: int | None = None,
                    galleries: Sequence[Sequence[int]] | None = None) -> CoatShortlists:
    """The coat's shortlists as fusion draws them under `settings` (`shortlist` overrides
    DEER_COAT_SHORTLIST): the photos every coat component compares, and the first of them that the keypoint
    matchers compare (DEER_COAT_PATTERN_SHORTLIST), from one ranking."""
    shortlist = shortlist or settings.coat_shortlist
    ranked = closest(body, encounters, shortlist, galleries)
    return CoatShortlists(_as_mask(ranked, shortlist), _as_mask(ranked, min(shortlist, settings.coat_pattern_shortlist)),
                          ranked)


def cascade_masks(raw: dict[str, np.ndarray], applies: dict[str, np.ndarray], pattern_mask: np.ndarray,
                  ranked: Sequence[np.ndarray], cascade: int) -> dict[str, np.ndarray]:
    """{costly component: the pairs it compares} under fusion's cascade (`shortlist_scores`): the costly
    components cheapest first, the first over `pattern_mask`, each later one over the `cascade` photos of each
    row that the one before it scored highest in `raw` (`narrowed`, ties in body order `ranked`). A photo the
    one before does not apply to (`applies[name]`, fusion's `Component.applies`) is not narrowed by it."""
    masks: dict[str, np.ndarray] = {}
    current = pattern_mask
    for name in sorted(raw, key=lambda n: component(n).cost):
        masks[name] = current
        if not cascade:
            continue
        following = np.zeros_like(pattern_mask)
        for i, row in enumerate(ranked):
            positions = [int(j) for j in row if current[i, j]]
            kept = narrowed(positions, raw[name][i, positions], cascade) if applies[name][i] else positions
            following[i, kept] = True
        current = following
    return masks


def pair_matrix(name: str, items: list, mask: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Component `name`'s scores of the pairs in `mask` (symmetric), NaN elsewhere, as the service scores a
    query against its shortlist; pairs already scored in `known` (NaN: not scored) are taken from it, not
    scored again. A component matched pair by pair (`costly`) is spread over the cores."""
    n = len(items)
    out = np.full((n, n), np.nan)
    todo = mask.copy()
    if known is not None:
        done = mask & ~np.isnan(known)
        out[done] = known[done]
        todo &= ~done
    work = [(i, [int(j) for j in np.flatnonzero(todo[i]) if j > i]) for i in range(n)]
    workers = len(os.sched_getaffinity(0)) if component(name).costly else 1
    chunks = [(name, items, work[k::workers]) for k in range(workers)]
    if workers == 1:
        scored = list(map(_scored_rows, chunks))
    else:
        with ProcessPoolExecutor(workers) as pool:
            scored = list(pool.map(_scored_rows, chunks))
    for rows in scored:
        for i, j, x in rows:
            out[i, j] = out[j, i] = x
    return out


def as_fusion_scores(matrix: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A coat component as fusion sees it: scored only against the query's shortlist (`mask`, row by row);
    any other photo takes the lowest score the query's shortlist got (fusion's "absent from the shortlist"
    rule), NaN when the query had no evidence at all."""
    scored = np.where(mask, matrix, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a query with no evidence at all: its floor is NaN
        floor = np.nanmin(scored, axis=1)
    return np.where(mask | np.isnan(floor)[:, None], scored, floor[:, None])


def coat_views(feats: list[dict], variant: str | None = None) -> list[dict]:
    """Each photo's coat view (`shared.components.coat.coat_view`'s shape) from its cached features; with a
    pattern `variant`, the view carries that variant's keypoints as its matcher's pattern."""
    matcher = VARIANTS[variant][0] if variant else None
    return [view_of(f["embeddings"], f["attributes"].get("facing"),
                    {matcher: ("eval", f[variant])} if variant and f[variant] is not None else {}) for f in feats]


def coat_matrices(feats: list[dict], mask: np.ndarray, service: dict[str, str],
                  matched: dict[str, np.ndarray] | None = None, variants: Sequence[str] = tuple(VARIANTS),
                  pattern_mask: np.ndarray | None = None, cascade: int = 0,
                  ranked: Sequence[np.ndarray] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The coat components as fusion scores them ({name: matrix}) against each photo's shortlist (`mask`,
    from `shortlists`; the keypoint matchers against `pattern_mask`, the first of it, as fusion's
    `coat_pattern_shortlist`, and under a `cascade` as `cascade_masks` says): every registered component
    reading the coat's features, the `service`'s pattern variants ({variant: component}) as the pattern
    components; the pattern `variants` measured alone over `pattern_mask`; and their raw pattern scores (pass
    them back as `matched` to score other shortlists without matching the pairs again)."""
    pattern_mask = mask if pattern_mask is None else pattern_mask
    pattern_pairs = pattern_mask | pattern_mask.T  # a pair's score serves both its photos
    raw = {name: pair_matrix(PATTERN_OF[VARIANTS[name][0]], coat_views(feats, name), pattern_pairs,
                             (matched or {}).get(name)) for name in dict.fromkeys([*service, *variants])}
    views = coat_views(feats)
    others = [c for c in reading(COAT) if c.name not in PATTERN_OF.values()]
    components = {c.name: as_fusion_scores(pair_matrix(c.name, views, mask | mask.T), mask)
                  for c in others if not c.costly}
    # the costly ones (the service's keypoint matchers, any other costly component) as fusion's cascade runs them
    costly = {c.name: (pair_matrix(c.name, views, pattern_pairs), views) for c in others if c.costly}
    costly.update({name: (raw[v], coat_views(feats, v)) for v, name in service.items()})
    compared = cascade_masks({n: m for n, (m, _) in costly.items()},
                             {n: np.array([component(n).applies(v) for v in vs]) for n, (_, vs) in costly.items()},
                             pattern_mask, ranked if ranked is not None else [np.arange(len(feats))] * len(feats),
                             cascade)
    components.update({n: as_fusion_scores(m, compared[n]) for n, (m, _) in costly.items()})
    return components, {name: as_fusion_scores(m, pattern_mask) for name, m in raw.items()}, raw


def extraction_ms(feats: list[dict]) -> dict[str, float]:
    """Median milliseconds per photo of each extraction step (this machine, one core per photo)."""
    steps = sorted({k for f in feats for k in f.get("timings", {})})
    return {k: round(float(np.median([f["timings"][k] for f in feats if k in f.get("timings", {})])), 1)
            for k in steps}
