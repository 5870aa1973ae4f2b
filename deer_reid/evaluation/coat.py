"""Coat components for `deer-reid eval`: the coat service's own extractor on every photo, then the same
pairwise scores fusion computes (colour, markings, pattern), as similarity matrices.

As in the service, coat is scored against a shortlist only: each photo against the `shortlist` photos its
body embedding finds closest; the others take the lowest score of the query's shortlist (fusion's rule for
individuals absent from a component's shortlist). Extraction is cached by image checksum and extractor
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
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from deer_reid.evaluation.dataset import Sample
from deer_reid.evaluation.features import pipeline_crop
from services.coat.extractor import COLOUR_VERSION, MARKINGS_VERSION, CoatExtractor
from services.coat.pattern import PatternExtractor, pack
from services.fusion.components.coat import (
    COLOUR,
    MARKINGS,
    PATTERN,
    colour_matrix,
    markings_matrix,
    pattern_similarity,
)
from shared.config import Settings

# The pattern variants measured: the service's (XFeat on the animal), XFeat on the whole crop, RootSIFT on the animal.
VARIANTS = {"xfeat-animal": ("xfeat", True), "xfeat-crop": ("xfeat", False), "rootsift-animal": ("rootsift", True)}
SERVICE_VARIANT = "xfeat-animal"


def _extract(args: tuple[bytes, int]) -> dict:
    """The service's coat features of one crop, and the other pattern variants on the same foreground."""
    crop, keypoints = args
    service = _service_extractor(keypoints)
    result = service.extract(crop)
    out: dict = {SERVICE_VARIANT: result.pattern, "embeddings": {e.version: e.array().copy() for e in result.embeddings},
                 "attributes": result.attributes, "flags": result.flags, "timings": result.timings_ms}
    rgb = np.array(Image.open(io.BytesIO(crop)).convert("RGB"))
    for name, (method, restrict) in VARIANTS.items():
        if name != SERVICE_VARIANT:
            if restrict and result.mask is None:
                out[name] = None
                continue
            found = PatternExtractor(method, keypoints)(rgb, result.mask if restrict else None)
            out[name] = pack(found) if len(found) >= 5 else None
    return out


_CACHE: dict = {}


def _service_extractor(keypoints: int) -> CoatExtractor:
    if keypoints not in _CACHE:
        method, restrict = VARIANTS[SERVICE_VARIANT]
        _CACHE[keypoints] = CoatExtractor(method, keypoints, restrict)
    return _CACHE[keypoints]


def coat_version(keypoints: int) -> str:
    """The version of the coat extractor the eval measures (the service's default)."""
    return _service_extractor(keypoints).version


def coat_features(samples: Sequence[Sample], settings: Settings, *, cache: Path | None = None,
                  progress: bool = True) -> list[dict]:
    """The coat features of each sample (the service's extractor on the pipeline's crop), cached."""
    keypoints = settings.coat_keypoints
    cache = cache or settings.model_cache.parent / "features"
    cache.mkdir(parents=True, exist_ok=True)
    versions = _service_extractor(keypoints).version + "|" + ",".join(VARIANTS)
    file = cache / f"coat_{hashlib.sha256(versions.encode()).hexdigest()[:12]}_crop{settings.crop_max_side}.pkl"
    known: dict = pickle.loads(file.read_bytes()) if file.exists() else {}
    shas = [hashlib.sha256(s.path.read_bytes()).hexdigest() for s in samples]
    todo = [i for i, sha in enumerate(shas) if sha not in known]
    if todo:
        workers = max(1, min(len(todo) // 8, len(os.sched_getaffinity(0))))
        crops = ((pipeline_crop(samples[i].path.read_bytes(), settings), keypoints) for i in todo)
        with ProcessPoolExecutor(workers) as pool:
            for i, feats in tqdm(zip(todo, pool.map(_extract, crops, chunksize=4)), total=len(todo),
                                 desc="coat features", unit="img", disable=not progress):
                known[shas[i]] = feats
        file.write_bytes(pickle.dumps(known))
    return [known[sha] for sha in shas]


def _pattern_rows(args: tuple[list[bytes | None], list[tuple[int, list[int]]]]) -> list[tuple[int, int, float]]:
    patterns, work = args
    return [(i, j, s) for i, js in work for j in js
            if (s := pattern_similarity(patterns[i], patterns[j])) is not None]


def shortlists(body: np.ndarray, shortlist: int, galleries: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(N, N) bool: j is among i's `shortlist` closest photos by body, or i among j's (scored both ways).
    With `galleries` (groups of photo indexes), each photo is shortlisted among its own group only: fusion
    shortlists among the gallery it searches, so a part of the run reported on its own (the held-out
    identities) must not spend its shortlist on photos outside it."""
    n = len(body)
    if galleries is not None:
        mask = np.zeros((n, n), dtype=bool)
        for group in galleries:
            ix = np.asarray(group, dtype=np.int64)
            mask[np.ix_(ix, ix)] = shortlists(body[np.ix_(ix, ix)], shortlist)
        return mask
    ranked = np.argsort(-np.where(np.eye(n, dtype=bool), -np.inf, body), axis=1, kind="stable")[:, :shortlist]
    mask = np.zeros((n, n), dtype=bool)
    mask[np.repeat(np.arange(n), ranked.shape[1]), ranked.ravel()] = True
    return mask | mask.T


def pattern_matrix(patterns: list[bytes | None], mask: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Pattern scores of the shortlisted pairs (`mask`), NaN elsewhere; pairs already scored in `known`
    (NaN: not scored) are taken from it, not matched again."""
    n = len(patterns)
    out = np.full((n, n), np.nan)
    todo = mask.copy()
    if known is not None:
        done = mask & ~np.isnan(known)
        out[done] = known[done]
        todo &= ~done
    work = [(i, [int(j) for j in np.flatnonzero(todo[i]) if j > i]) for i in range(n)]
    workers = len(os.sched_getaffinity(0))
    chunks = [(patterns, work[k::workers]) for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        for rows in pool.map(_pattern_rows, chunks):
            for i, j, s in rows:
                out[i, j] = out[j, i] = s
    return out


def as_fusion_scores(matrix: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A coat component as fusion sees it: scored only against the shortlist; any other photo takes the
    lowest score the query's shortlist got (fusion's "absent from the shortlist" rule), NaN when the
    query had no evidence at all."""
    scored = np.where(mask, matrix, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a query with no evidence at all: its floor is NaN
        floor = np.nanmin(np.where(np.eye(len(matrix), dtype=bool), np.nan, scored), axis=1)
    return np.where(mask | np.isnan(floor)[:, None], scored, floor[:, None])


def coat_matrices(feats: list[dict], body: np.ndarray, shortlist: int, galleries: Sequence[Sequence[int]] | None = None,
                  matched: dict[str, np.ndarray] | None = None, variants: Sequence[str] = tuple(VARIANTS)
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The coat components as fusion scores them ({name: matrix}), the pattern `variants` measured (the
    service's is always matched: it is the pattern component), and their raw pattern scores (pass them back
    as `matched` to score other shortlists without matching the pairs again). `galleries`: as in
    `shortlists`."""
    mask = shortlists(body, shortlist, galleries)
    colour = [f["embeddings"].get(COLOUR_VERSION) for f in feats]
    facing = [f["attributes"].get("facing") for f in feats]
    maps = [f["embeddings"].get(MARKINGS_VERSION) for f in feats]
    variants = {name: pattern_matrix([f[name] for f in feats], mask, (matched or {}).get(name))
                for name in dict.fromkeys([SERVICE_VARIANT, *variants])}
    components = {COLOUR: colour_matrix(colour), MARKINGS: markings_matrix(maps, facing),
                  PATTERN: variants[SERVICE_VARIANT]}
    return ({name: as_fusion_scores(m, mask) for name, m in components.items()},
            {name: as_fusion_scores(m, mask) for name, m in variants.items()}, variants)


def extraction_ms(feats: list[dict]) -> dict[str, float]:
    """Median milliseconds per photo of each extraction step (this machine, one core per photo)."""
    steps = sorted({k for f in feats for k in f.get("timings", {})})
    return {k: round(float(np.median([f["timings"][k] for f in feats if k in f.get("timings", {})])), 1)
            for k in steps}
