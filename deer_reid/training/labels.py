"""`deer-reid export-labels DIR`: a property's own identifications as a folder `deer-reid train` accepts.

The loop this closes: ingest -> fusion decides -> people confirm or correct (review) -> export ->
train a model on the property's own deer -> `up --body-model NAME` -> `eval` on identities it never
learned. Until the review queue exists (#12) the machine's decisions are exported too, with a
`decided_by` column; `--human-only` keeps what a person decided.

Layout: DIR/images/<detection id>.jpg (the detection's crop, as the pipeline saw it),
DIR/metadata.csv (path, identity, encounter, viewpoint, decided_by, property, site, camera,
captured_at), DIR/sex.csv (identity, sex) for individuals of known sex, DIR/pairs.csv (a, b, answer,
actor, answered_at, a_path, b_path): the pairs people answered in question mode (`same`, `different`,
`cannot-tell`; undone answers left out), labelled pairs of the property's own animals. An encounter is one image:
photos of one frame share it, so eval never counts a frame's twin as a re-identification.
"""
from __future__ import annotations

import csv
from pathlib import Path

from shared.db import create_pool


class ExportError(ValueError):
    pass


async def export_labels(dsn: str, out: Path, *, prop: str | None = None, human_only: bool = False,
                        source_labels: bool = False) -> dict:
    """`source_labels`: the identities are the labels the photos came with (a Camtrap DP `individualID`),
    for every detection that has one, whatever fusion or people decided: a labelled set to run `eval` on."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty: export into a new folder")
    if source_labels and human_only:
        raise ExportError("--source-labels and --human-only choose two different kinds of label; give one")
    pool = await create_pool(dsn, max_size=2)
    try:
        if source_labels:
            rows = await pool.fetch(
                """SELECT d.id, d.source_label AS individual_id, d.image_sha256, 'uploader' AS decided_by, d.property,
                          d.site, d.camera, d.captured_at, d.crop, d.result->'pose'->>'viewpoint' AS viewpoint,
                          NULL AS sex
                   FROM detections d
                   WHERE d.source_label IS NOT NULL AND ($1::text IS NULL OR d.property = $1)
                   ORDER BY d.source_label, d.captured_at, d.id""", prop)
        else:
            rows = await pool.fetch(
                """SELECT d.id, d.individual_id, d.image_sha256, d.decided_by, d.property, d.site, d.camera,
                          d.captured_at, d.crop, d.result->'pose'->>'viewpoint' AS viewpoint, i.sex
                   FROM detections d JOIN individuals i ON i.id = d.individual_id
                   WHERE d.state IN ('assigned', 'new') AND ($1::text IS NULL OR d.property = $1)
                     AND (NOT $2 OR d.decided_by = 'human')
                   ORDER BY d.individual_id, d.captured_at, d.id""", prop, human_only)
        pairs = await pool.fetch(
            """SELECT a, b, answer, actor, answered_at FROM identity_answers
               WHERE NOT undone AND ($1::text IS NULL OR property = $1) ORDER BY id""", prop)
    finally:
        await pool.close()
    if not rows:
        raise ExportError(("no detections with an uploader's label" if source_labels else "no decided detections")
                          + " to export" + (" by a person" if human_only else "")
                          + (f" in property {prop!r}" if prop else ""))
    (out / "images").mkdir(parents=True, exist_ok=True)
    sexes: dict[str, str] = {}
    with open(out / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "identity", "encounter", "viewpoint", "decided_by", "property", "site", "camera",
                    "captured_at"])
        for r in rows:
            rel = f"images/{r['id']}.jpg"
            (out / rel).write_bytes(bytes(r["crop"]))
            identity = r["individual_id"] if source_labels else f"{r['property']}-{r['individual_id']}"
            if r["sex"] in ("male", "female"):
                sexes[identity] = r["sex"]
            w.writerow([rel, identity, r["image_sha256"][:16], r["viewpoint"] or "", r["decided_by"] or "",
                        r["property"], r["site"], r["camera"], r["captured_at"].isoformat()])
    with open(out / "sex.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["identity", "sex"])
        w.writerows(sorted(sexes.items()))
    exported = {r["id"] for r in rows}
    with open(out / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "answer", "actor", "answered_at", "a_path", "b_path"])
        for r in pairs:
            w.writerow([r["a"], r["b"], r["answer"], r["actor"], r["answered_at"].isoformat(),
                        *(f"images/{d}.jpg" if d in exported else "" for d in (r["a"], r["b"]))])
    by = {}
    for r in rows:
        by[r["decided_by"] or "unknown"] = by.get(r["decided_by"] or "unknown", 0) + 1
    return {"folder": str(out), "detections": len(rows), "identities": len({r["individual_id"] for r in rows}),
            "decided_by": by, "answered_pairs": len(pairs)}
