"""A labelled folder: metadata.csv (+ optional sex.csv), validated with errors that name the row."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from shared.schemas import DetectionClass

REQUIRED = ("path", "identity")
OPTIONAL = ("viewpoint", "encounter", "captured_at", "site", "camera")
SEX_TO_CLASS = {"male": DetectionClass.buck, "female": DetectionClass.doe}


class DatasetError(ValueError):
    """The labelled folder is unusable; the message names the file and row."""


@dataclass(frozen=True)
class Sample:
    index: int
    path: Path
    identity: str
    encounter: str  # images of one sighting; each image is its own encounter when the column is absent
    viewpoint: str | None
    cls: DetectionClass
    captured_at: str | None = None
    site: str | None = None
    camera: str | None = None


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return [c.strip() for c in (reader.fieldnames or [])], rows
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable CSV file: {exc}") from None


def identities_in_seeded_order(samples: Sequence[Sample], seed: int) -> dict[str, list[Sample]]:
    """{identity: its samples}, the identities in a seeded random order (the same for a seed whatever the
    rows' order): how splits, folds and `--limit` draw whole animals."""
    by_id: dict[str, list[Sample]] = {}
    for s in samples:
        by_id.setdefault(s.identity, []).append(s)
    names = sorted(by_id)
    return {names[i]: by_id[names[i]] for i in np.random.default_rng(seed).permutation(len(names))}


def load_dataset(root: Path) -> list[Sample]:
    root = Path(root)
    meta = root / "metadata.csv"
    columns, rows = _read_csv(meta)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise DatasetError(f"{meta}: missing column(s) {', '.join(missing)} (have: {', '.join(columns)})")
    if not rows:
        raise DatasetError(f"{meta}: no rows")
    sexes: dict[str, str] = {}
    sex_file = root / "sex.csv"
    if sex_file.exists():
        sex_columns, sex_rows = _read_csv(sex_file)
        if not {"identity", "sex"} <= set(sex_columns):
            raise DatasetError(f"{sex_file}: needs columns identity,sex")
        for n, row in enumerate(sex_rows, start=2):
            sex = (row.get("sex") or "").strip().lower()
            if sex not in SEX_TO_CLASS:
                raise DatasetError(f"{sex_file} row {n}: sex {row.get('sex')!r} is not male or female")
            sexes[(row.get("identity") or "").strip()] = sex
    resolved_root = root.resolve()
    samples = []
    for n, row in enumerate(rows, start=2):  # row 1 is the header
        rel = (row.get("path") or "").strip()
        identity = (row.get("identity") or "").strip()
        if not rel or not identity:
            raise DatasetError(f"{meta} row {n}: empty path or identity")
        path = (root / rel).resolve()
        if resolved_root not in path.parents:
            raise DatasetError(f"{meta} row {n}: path {rel!r} leaves the data folder")
        if not path.is_file():
            raise DatasetError(f"{meta} row {n}: image {rel!r} not found")
        encounter = (row.get("encounter") or "").strip() or f"image-{n}"
        sex = sexes.get(identity)
        samples.append(Sample(
            index=len(samples), path=path, identity=identity, encounter=encounter,
            viewpoint=(row.get("viewpoint") or "").strip() or None,
            cls=SEX_TO_CLASS[sex] if sex else DetectionClass.unknown,
            captured_at=(row.get("captured_at") or "").strip() or None,
            site=(row.get("site") or "").strip() or None, camera=(row.get("camera") or "").strip() or None,
        ))
    return samples


def queries_with_a_positive(samples: list[Sample]) -> int:
    """How many samples can be a leave-one-encounter-out query: another photo of the same identity in
    another encounter exists. Pure."""
    encounters: dict[str, set[str]] = {}
    for s in samples:
        encounters.setdefault(s.identity, set()).add(s.encounter)
    return sum(1 for s in samples if len(encounters[s.identity]) > 1)


def check_queryable(samples: list[Sample]) -> str | None:
    """Refuse a retrieval run that would measure nothing; a warning when fewer than half can be queries.
    (All of an identity's photos in one encounter is a natural layout for a folder without sightings: it
    leaves every query without a positive, and top-1 would read 0.0 as if measured.)"""
    n = queries_with_a_positive(samples)
    if n == 0:
        raise DatasetError(
            f"none of the {len(samples)} photos can be a query: every identity's photos share one encounter, so "
            "no photo has a match in another encounter. Give each sighting its own `encounter` (or leave the "
            "column out: each photo is then its own encounter)")
    if n < len(samples) / 2:
        return (f"only {n} of {len(samples)} photos can be queries (the others' identities were seen in one "
                "encounter only); the figures speak for those")
    return None
