"""`deer-reid train soup NAME --from A B ...`: one network from the weights of several fine-tuned ones.

Fine-tunes of one base started from the same ImageNet weights stay in one basin of the loss, so the
average of their weights is a network of its own (a "model soup", Wortsman et al., ICML 2022): as cheap
at run time as any one of them (fast mode), and often as good as their ensemble, which costs one network
per member (enhanced mode). The soup is greedy: ingredients are tried in order of their own validation
figures, and each is kept only when the soup's validation improves. Like the epoch choice in `train`,
the choice sees the validation identities only, never the holdout, and the ingredients must share one
split of the same data so that the soup's holdout is truly unseen.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from deer_reid.evaluation.dataset import load_dataset
from deer_reid.training.train import (
    TrainConfig,
    TrainError,
    _folder_checksum,
    _load_images,
    better,
    check_name,
    validation_figures,
)
from shared.config import Settings
from shared.models import CARD_FILE, TRAINED_WEIGHTS, get_spec, read_card, resolve_weights, sha256_of

SPLIT_KEYS = ("train", "validation", "holdout")


def ingredients_of(names: list[str], cache: Path) -> list[dict]:
    """The ingredients' cards, checked to be soupable: trained body networks of one base and input size,
    from the same data with the same identities in each part."""
    if len(names) < 2:
        raise TrainError("a soup needs at least two trained models (--from A B ...)")
    if len(set(names)) != len(names):
        raise TrainError("--from names a model twice")
    cards = []
    for name in names:
        card = read_card(name, cache)
        if card is None or card.get("kind") != "deer-reid-model-card":
            raise TrainError(f"{name!r} is not a body network trained by `deer-reid train` in {cache}")
        cards.append(card)
    first = cards[0]
    for card in cards[1:]:
        for key, what in (("base", "base network"), ("input_size", "input size")):
            if card[key] != first[key]:
                raise TrainError(f"{card['name']} and {first['name']} differ in {what} "
                                 f"({card[key]} and {first[key]}): their weights cannot be averaged")
        if card["data"]["checksum"] != first["data"]["checksum"]:
            raise TrainError(f"{card['name']} and {first['name']} were trained on different data")
        for part in SPLIT_KEYS:
            if sorted(card["identities"][part]) != sorted(first["identities"][part]):
                raise TrainError(f"{card['name']} and {first['name']} split the identities differently ({part}): "
                                 "the soup's holdout would not be unseen by all of them")
    return cards


def average(states: list[dict]) -> dict:
    """The element-wise mean of state dicts (batch-norm statistics included); integer counters are taken
    from the first."""
    import torch

    out = {}
    for key, value in states[0].items():
        if torch.is_floating_point(value):
            out[key] = torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def soup(name: str, ingredient_names: list[str], settings: Settings, *, overwrite: bool = False,
         in_use: set[str] = frozenset(), progress: bool = True) -> dict:
    import torch

    started = time.monotonic()
    cache = Path(settings.model_cache)
    cards = ingredients_of(ingredient_names, cache)
    if name in ingredient_names:
        raise TrainError(f"{name!r} is one of the ingredients: the soup needs a name of its own")
    first = cards[0]
    folder = check_name(TrainConfig(name=name, base=first["base"], overwrite=overwrite), cache, set(in_use))
    data_dir = Path(first["data"]["folder"])
    samples = load_dataset(data_dir)
    if _folder_checksum(samples, data_dir) != first["data"]["checksum"]:
        raise TrainError(f"{data_dir} changed since the ingredients were trained: their validation would differ")
    validation_ids = set(first["identities"]["validation"])
    if not validation_ids:
        raise TrainError("the ingredients had no validation identities: nothing to choose the soup on")
    val_samples = [s for s in samples if s.identity in validation_ids]
    images, _ = _load_images(val_samples, first["input_size"], settings, progress)
    keep = [i for i, im in enumerate(images) if im is not None]
    x_val, val_samples = np.stack([images[i] for i in keep]), [val_samples[i] for i in keep]

    spec = get_spec(first["base"])
    module = spec.build()
    states = {}
    for card in cards:
        found = resolve_weights(get_spec(card["name"], cache), cache)  # checksum verified against the card
        if found is None:
            raise TrainError(f"{card['name']} has a card but no weights in {cache / card['name']}")
        states[card["name"]] = torch.load(found[0], map_location="cpu", weights_only=True)

    def measure(state: dict) -> dict:
        module.load_weights(state)
        return validation_figures(module, x_val, val_samples, spec, "fp32")

    alone = {n: measure(s) for n, s in states.items()}
    order = sorted(states, key=lambda n: (alone[n].get("top1", 0), alone[n].get("mAP", 0)), reverse=True)
    kept, figures = [order[0]], alone[order[0]]
    steps = [{"ingredient": order[0], "validation": figures, "kept": True, "note": "the best ingredient alone"}]
    for candidate in order[1:]:
        trial = measure(average([states[n] for n in kept + [candidate]]))
        keep_it = better(trial, figures)
        steps.append({"ingredient": candidate, "validation": trial, "kept": keep_it})
        if progress:
            print(f"soup + {candidate}: validation top-1 {trial['top1']:.3f} mAP {trial['mAP']:.3f} "
                  f"({'kept' if keep_it else 'left out'})", flush=True)
        if keep_it:
            kept.append(candidate)
            figures = trial

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / TRAINED_WEIGHTS
    torch.save(average([states[n] for n in kept]), weights.with_suffix(".partial"))
    weights.with_suffix(".partial").replace(weights)
    for stale in (folder / "best.pt", folder / "checkpoint.pt"):  # a name reused for a soup: no old training state
        stale.unlink(missing_ok=True)
    checksum = sha256_of(weights)
    preprocessing = first["embedding_version"].split(":", 2)[2]
    card = {
        "kind": "deer-reid-model-card", "name": name, "base": first["base"], "input_size": first["input_size"],
        "dim": first["dim"], "weights_file": TRAINED_WEIGHTS, "weights_sha256": checksum,
        "embedding_version": f"{name}:{checksum[:12]}:{preprocessing}",
        "created_at": datetime.now(timezone.utc).isoformat(),
        "data": first["data"], "identities": first["identities"], "classes": first.get("classes"),
        "classes_by": first.get("classes_by"),
        "soup": {"method": "greedy uniform soup of weights, ingredients in order of validation, each kept only "
                           "if the soup's validation improves (Wortsman et al. 2022)",
                 "ingredients": {c["name"]: {"weights_sha256": c["weights_sha256"], "validation": alone[c["name"]],
                                             "hyper_parameters": c.get("hyper_parameters")} for c in cards},
                 "kept": kept, "steps": steps},
        "selected_epoch": None, "validation": figures, "history": steps,
        "seconds": round(time.monotonic() - started, 1),
        "seconds_training_ingredients": round(sum(c.get("seconds", 0) for c in cards if c["name"] in kept), 1),
        "loss": "soup of sub-center ArcFace fine-tunes",
    }
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2))
    return card

