"""Antler components for `deer-reid eval --antler`: the antler service's own geometry and fingerprint on
every photo of the labelled males, and fusion's antler score as a similarity matrix.

No deer antler data is in reach: on nyala-train the males carry horns, which are not antlers (no yearly
casting, no tines). The figures say how the fingerprint separates individuals by the head-top region,
nothing about tine counts, which have no labels here. Extraction is cached by image checksum and version.
"""
from __future__ import annotations

import csv
import hashlib
import pickle
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from deer_reid.evaluation.dataset import Sample
from deer_reid.evaluation.features import pipeline_crop
from services.antler.extractor import cut_by_frame, measure
from services.antler.fingerprint import Fingerprinter, project
from services.antler.seasons import SeasonCalendar
from shared.config import Settings
from shared.models import load_configured

WHEN = datetime(2025, 10, 1, tzinfo=timezone.utc)  # nyala has no capture times: one season for all
HORNS_ARE_NOT_ANTLERS = ("Nyala males carry horns, not antlers: horns are never cast and have no tines. These "
                         "figures say how well the head-top region tells individuals apart, not how the antler "
                         "geometry (points, spread, symmetry) performs, which has no labels here.")


def males(data: Path, samples: Sequence[Sample]) -> tuple[list[Sample], dict]:
    """The samples of identities marked male in the folder's sex.csv (identity,sex)."""
    path = Path(data) / "sex.csv"
    if not path.exists():
        raise ValueError(f"--antler needs {path} (identity,sex) to restrict the run to males")
    with open(path) as f:
        male = {r["identity"] for r in csv.DictReader(f) if r["sex"].strip().lower() == "male"}
    kept = [s for s in samples if s.identity in male]
    return kept, {"male_identities": len({s.identity for s in kept}), "images": len(kept),
                  "identities_dropped": len({s.identity for s in samples}) - len({s.identity for s in kept})}


def antler_features(samples: Sequence[Sample], settings: Settings, *, cache: Path | None = None,
                    progress: bool = True) -> tuple[list[dict], str]:
    """Per sample: the antler service's outcome (status, flags, geometry), its 64-d fingerprint and the
    full region embedding; and the fingerprint version."""
    model = load_configured(settings.antler_model, settings)
    fingerprinter = Fingerprinter(model)
    calendar = SeasonCalendar.parse(settings.antler_season_start, settings.antler_season_end,
                                    settings.antler_casting_months)
    cache = cache or settings.model_cache.parent / "features"
    cache.mkdir(parents=True, exist_ok=True)
    file = cache / f"antler2_{hashlib.sha256(fingerprinter.version.encode()).hexdigest()[:12]}_crop{settings.crop_max_side}.pkl"
    known: dict = pickle.loads(file.read_bytes()) if file.exists() else {}
    shas = [hashlib.sha256(s.path.read_bytes()).hexdigest() for s in samples]
    todo = [i for i, sha in enumerate(shas) if sha not in known]
    for start in tqdm(range(0, len(todo), 16), desc="antler features", unit="batch", disable=not progress):
        chunk = todo[start:start + 16]
        # One geometry and one network pass a photo: measured as if the box lay inside the frame, then the
        # service's rule for a whole-image detection (its box starts at the photo's top edge) applied to it.
        found = [measure(pipeline_crop(samples[i].path.read_bytes(), settings), "buck", 2, WHEN, calendar)
                 for i in chunk]
        have = [k for k, f in enumerate(found) if f.region is not None]
        t0 = time.perf_counter()
        full = fingerprinter.full([found[k].region for k in have]) if have else np.zeros((0, model.spec.dim))
        ms = round(1000 * (time.perf_counter() - t0) / max(1, len(have)), 2)
        full_of = dict(zip(have, full))
        for k, (i, f) in enumerate(zip(chunk, found)):
            uncut = None if k not in full_of else project(full_of[k][None], fingerprinter.matrix)[0]
            cut = uncut is not None and cut_by_frame(f.attributes["geometry"]["touches_top"], 0)
            known[shas[i]] = {"status": "no-evidence" if cut else f.status,
                              "flags": ["cut-by-frame", *f.flags] if cut else f.flags,
                              "geometry": f.attributes.get("geometry"),
                              "fingerprint": None if cut else uncut, "fingerprint_uncut": uncut,
                              "full": full_of.get(k),
                              "timings": {**f.timings_ms, **({"fingerprint": ms} if uncut is not None else {})}}
    if todo:
        file.write_bytes(pickle.dumps(known))
    return [known[sha] for sha in shas], fingerprinter.version


def notes(feats: list[dict], ids: list[str], matrix: np.ndarray) -> dict:
    """Outcome counts, timings, and the same- vs other-animal antler similarity (for the conflict rule)."""
    outcome: dict[str, int] = {}
    for f in feats:
        key = "antlers (ok)" if f["status"] == "ok" else f["flags"][0]
        outcome[key] = outcome.get(key, 0) + 1
    ident = np.asarray(ids, dtype=object)
    same = (ident[:, None] == ident[None, :]) & ~np.eye(len(ids), dtype=bool)
    other = ident[:, None] != ident[None, :]
    vals = {name: matrix[m & ~np.isnan(matrix)] for name, m in (("same animal", same), ("other animals", other))}
    return {
        "note": HORNS_ARE_NOT_ANTLERS,
        "outcomes": dict(sorted(outcome.items())),
        "ms_median": {k: round(float(np.median([f["timings"][k] for f in feats if k in f["timings"]])), 2)
                      for k in sorted({k for f in feats for k in f["timings"]})},
        "similarity_percentiles": {name: {p: round(float(np.percentile(v, p)), 3) for p in (5, 25, 50, 75, 95)}
                                   for name, v in vals.items() if len(v)},
    }
