"""A folder of trail-camera photos with MegaDetector output for it, written from the published format
(lila.science/megadetector-output-format), never copied from anywhere: the real photos re-encoded (so
the stack never knows them already) with a box around each animal, empty frames, a frame with only a
person, an entry whose image is missing, one that climbs out of the folder, and an image with no entry.

    python -m tests.megadetector_tool OUT --photos ../shared/data/nyala-train --count 40

writes OUT/cards/north/*.JPG and OUT/md.json, and prints what `deer-reid ingest OUT/cards --detections
OUT/md.json` should upload, skip and refuse. The photos stay outside the repository.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from PIL import Image

ANIMAL_BOX = [0.02, 0.03, 0.95, 0.94]  # nyala-train's photos are framed on the animal


def reencoded(path: Path, seed: str) -> bytes:
    out = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(out, format="JPEG", quality=92, comment=seed.encode())
    return out.getvalue()


def empty_frame(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (90 + seed, 100, 80)).save(out, format="JPEG", comment=f"empty-{seed}".encode())
    return out.getvalue()


def write(out: Path, photos: list[Path], *, empties: int = 5, detector_root: str = "E:\\trailcam\\2025\\") -> dict:
    """Write the folder and its MegaDetector JSON; returns what an ingest should report."""
    cards = out / "cards" / "north"
    cards.mkdir(parents=True, exist_ok=True)
    images = []
    for i, path in enumerate(photos):
        name = f"IMG_{i:04d}.JPG"
        (cards / name).write_bytes(reencoded(path, f"md-tool/{i}"))
        # absolute paths from the machine the detector ran on, as MegaDetector writes them
        images.append({"file": f"{detector_root}north\\{name}",
                       "detections": [{"category": "1", "conf": 0.93, "bbox": ANIMAL_BOX},
                                      {"category": "1", "conf": 0.07, "bbox": [0.1, 0.1, 0.2, 0.2]}]})
    for k in range(empties):
        name = f"EMPTY_{k:02d}.JPG"
        (cards / name).write_bytes(empty_frame(k))
        images.append({"file": f"{detector_root}north\\{name}", "detections": []})
    (cards / "PERSON.JPG").write_bytes(empty_frame(99))
    images.append({"file": f"{detector_root}north\\PERSON.JPG",
                   "detections": [{"category": "2", "conf": 0.97, "bbox": [0.4, 0.1, 0.2, 0.8]}]})
    (cards / "NO_ENTRY.JPG").write_bytes(empty_frame(98))
    images.append({"file": f"{detector_root}north\\DELETED.JPG", "detections": [{"category": "1", "conf": 0.9,
                                                                                 "bbox": ANIMAL_BOX}]})
    images.append({"file": "..\\..\\etc\\passwd", "detections": [{"category": "1", "conf": 0.9, "bbox": ANIMAL_BOX}]})
    doc = {"info": {"format_version": "1.4", "detector": "md_v5a.0.0.pt",
                    "detection_completion_time": "2025-11-05 10:00:00"},
           "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"}, "images": images}
    (out / "md.json").write_text(json.dumps(doc, indent=1))
    return {"uploaded": len(photos), "skipped_empty": empties + 1, "refused_entries": 2, "images_without_entry": 1,
            "never_uploaded": {"person": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--photos", type=Path, required=True, help="a labelled folder (metadata.csv with path)")
    parser.add_argument("--count", type=int, default=40)
    args = parser.parse_args()
    with open(args.photos / "metadata.csv", newline="") as f:
        paths = [args.photos / row["path"] for row in csv.DictReader(f)][:args.count]
    print(json.dumps(write(args.out, paths), indent=2))


if __name__ == "__main__":
    main()
