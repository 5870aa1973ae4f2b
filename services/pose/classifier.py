"""The viewpoint classifier as `deer-reid train viewpoint` writes it into the model cache, loaded: a body
network (by name, from the one registry) and a small head over its features of a crop and of the crop's
mirror image (`viewpoint.mirror_features`).

<model cache>/<name>/card.json names the backbone, the classes, the threshold and the identities it was
trained, selected and held out on; head.npz holds the head, its checksum pinned by the card.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from services.pose.viewpoint import Viewpoint, ViewpointHead, mirror_features
from shared.images import model_input
from shared.models import CARD_FILE, LoadedModel, MissingWeights, load_model, read_card, sha256_of

HEAD_FILE = "head.npz"
KIND = "viewpoint-classifier"


def write_head(folder: Path, head: ViewpointHead) -> str:
    """Write the head's arrays; returns the file's checksum (the card pins it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / HEAD_FILE
    tmp = path.with_name(HEAD_FILE + ".partial")
    with open(tmp, "wb") as f:
        np.savez(f, weights=head.weights.astype(np.float32), bias=head.bias.astype(np.float32))
    tmp.replace(path)
    return sha256_of(path)


def read_head(name: str, cache: Path) -> tuple[ViewpointHead, dict]:
    card = read_card(name, cache)
    if card is None or card.get("kind") != KIND:
        raise MissingWeights(f"no viewpoint classifier {name!r} in {cache}: train one with "
                             f"`deer-reid train viewpoint DATA_DIR --name {name}` (metadata.csv needs a viewpoint column)")
    path = Path(cache) / name / HEAD_FILE
    if not path.exists() or sha256_of(path) != card["head_sha256"]:
        raise MissingWeights(f"viewpoint classifier {name}: {path} is missing or does not match its card's checksum")
    with np.load(path) as arrays:
        head = ViewpointHead(tuple(card["classes"]), arrays["weights"], arrays["bias"], float(card["threshold"]),
                             version=f"{name}:{card['head_sha256'][:12]}")
    return head, card


class ViewpointClassifier:
    """Crops in, viewpoints out: the backbone embeds each crop and its mirror image in one batch."""

    def __init__(self, name: str, cache: Path, *, device: str = "auto", precision: str = "fp32",
                 engine: str = "auto"):
        self.head, self.card = read_head(name, cache)
        self.backbone: LoadedModel = load_model(self.card["backbone"], cache, device=device, precision=precision,
                                                engine=engine)
        if self.backbone.version != self.card["backbone_version"]:
            raise MissingWeights(f"viewpoint classifier {name} was trained on {self.card['backbone_version']}, "
                                 f"the cache holds {self.backbone.version}: train it again")

    @property
    def version(self) -> str:
        return self.head.version

    def features(self, crops: list[bytes]) -> np.ndarray:
        """The head's inputs for JPEG crops."""
        return features_of(self.backbone, crops)

    def predict(self, crops: list[bytes]) -> list[Viewpoint]:
        return self.head.viewpoints(self.features(crops)) if crops else []


def features_of(backbone: LoadedModel, crops: list[bytes]) -> np.ndarray:
    """`mirror_features` of each crop, the crops and their mirror images embedded in one batch."""
    size = backbone.spec.input_size
    x = np.stack([model_input(c, size) for c in crops])
    both = backbone.embed(np.concatenate([x, np.ascontiguousarray(x[:, :, ::-1])]))
    n = len(crops)
    return mirror_features(both[:n], both[n:])


def card_json(card: dict) -> str:
    return json.dumps(card, indent=2, sort_keys=True) + "\n"


__all__ = ["CARD_FILE", "HEAD_FILE", "KIND", "ViewpointClassifier", "card_json", "features_of", "read_head",
           "write_head"]
