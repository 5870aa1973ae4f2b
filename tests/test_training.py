"""`deer-reid train` on a handful of real photos (plumbing, not accuracy), its model card, loading by name,
determinism and resume, the bad inputs, the evaluation's fairness rule, and `export-labels`."""
from __future__ import annotations

import csv
import functools
import shutil
from pathlib import Path

import numpy as np
import pytest

from deer_reid.evaluation.dataset import DatasetError, load_dataset
from deer_reid.training import data as training_data
from deer_reid.training.train import TrainConfig, TrainError, train
from shared.config import Settings
from shared.models import load_model, read_card, resolve_weights, get_spec
from tests.conftest import labelled_subset

TINY = dict(epochs=1, input_size=64, holdout_identities=1, validation_identities=1, batch=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, nyala_rows, nyala_paths):
    """Six identities with four real photos each, in a folder of the test's own (never in the repo)."""
    return labelled_subset(tmp_path_factory.mktemp("labelled"), nyala_rows, nyala_paths, 6, 4)


def settings_for(tmp_path: Path) -> Settings:
    cache = tmp_path / "models"
    return Settings(model_cache=cache, home=tmp_path / "home", torch_threads=2)


def variant(src: Path, dst: Path, edit) -> Path:
    """A copy of the labelled folder with metadata rows edited."""
    shutil.copytree(src, dst)
    rows = list(csv.DictReader(open(dst / "metadata.csv")))
    rows = edit(rows, dst)
    with open(dst / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dst


def test_a_tiny_training_run_is_a_model_like_any_other(folder, tmp_path):
    settings = settings_for(tmp_path)
    card = train(folder, TrainConfig(name="tiny", **TINY), settings, progress=False)
    assert read_card("tiny", settings.model_cache) == card
    ids = card["identities"]
    assert not set(ids["holdout"]) & (set(ids["train"]) | set(ids["validation"]))  # identity-disjoint
    assert len(ids["holdout"]) == 1 and len(ids["validation"]) == 1 and len(ids["train"]) == 4
    assert card["classes_by"] == "identity x viewpoint" and card["base"] == "efficientnet_lite0"
    assert card["data"]["images"] == 24 and len(card["data"]["checksum"]) == 64
    assert card["history"][0]["note"].startswith("ImageNet") and card["selected_epoch"] == 1
    # loaded by name through the registry, checksum verified, its version named after it
    model = load_model("tiny", settings.model_cache)
    assert model.version == card["embedding_version"] and not model.random_weights
    assert get_spec("tiny", settings.model_cache).input_size == 64
    vec = model.embed(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    assert vec.shape == (2, 1280) and np.allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-3)
    # a tampered weights file is refused
    (settings.model_cache / "tiny" / "model.pt").write_bytes(b"not the weights")
    with pytest.raises(Exception, match="checksum"):
        resolve_weights(get_spec("tiny", settings.model_cache), settings.model_cache)


def test_the_same_seed_trains_the_same_weights_and_resume_continues_exactly(folder, tmp_path, monkeypatch):
    cfg = dict(TINY, epochs=2)
    one = train(folder, TrainConfig(name="a", **cfg), settings_for(tmp_path / "1"), progress=False)
    two = train(folder, TrainConfig(name="a", **cfg), settings_for(tmp_path / "2"), progress=False)
    assert one["weights_sha256"] == two["weights_sha256"]

    # interrupted after the first epoch, then resumed: the same weights as the uninterrupted run
    real = training_data.augment
    calls = {"n": 0}
    steps_per_epoch = 16 // cfg["batch"]  # 4 training identities x 4 photos

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > steps_per_epoch:
            raise KeyboardInterrupt("power cut")
        return real(*a, **k)

    settings = settings_for(tmp_path / "3")
    monkeypatch.setattr(training_data, "augment", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(folder, TrainConfig(name="a", **cfg), settings, progress=False)
    monkeypatch.setattr(training_data, "augment", real)
    with pytest.raises(TrainError, match="same settings"):
        train(folder, TrainConfig(name="a", **{**cfg, "epochs": 3}, resume=True), settings, progress=False)
    resumed = train(folder, TrainConfig(name="a", **cfg, resume=True), settings, progress=False)
    assert resumed["weights_sha256"] == one["weights_sha256"]


def test_averaged_weights_are_measured_on_validation_and_kept_only_when_better(folder, tmp_path):
    cfg = dict(TINY, epochs=3, average_from=2)
    card = train(folder, TrainConfig(name="avg", **cfg), settings_for(tmp_path), progress=False)
    averaged = card["history"][-1]
    assert averaged["epoch"] == "average of epochs 2-3" and averaged["epochs_averaged"] == 2
    singles = [h for h in card["history"][1:-1]]
    best_single = max((h["validation"]["top1"], h["validation"]["mAP"]) for h in singles)
    mine = (averaged["validation"]["top1"], averaged["validation"]["mAP"])
    # the card names what was chosen, and it is the better on validation
    assert card["selected_epoch"] == (averaged["epoch"] if mine > best_single else
                                      next(h["epoch"] for h in singles
                                           if (h["validation"]["top1"], h["validation"]["mAP"]) == best_single))
    assert card["hyper_parameters"]["average_from"] == 2
    model = load_model("avg", settings_for(tmp_path).model_cache)
    assert model.version == card["embedding_version"]


def test_refit_trains_again_on_validation_identities_for_the_chosen_epochs_and_never_on_the_holdout(folder, tmp_path):
    settings = settings_for(tmp_path)
    plain = train(folder, TrainConfig(name="plain", **dict(TINY, epochs=2, holdout_identities=2)), settings, progress=False)
    card = train(folder, TrainConfig(name="refit", refit=True, **dict(TINY, epochs=2, holdout_identities=2)), settings, progress=False)
    ids = card["identities"]
    # the selection is the plain run's (same seed), then the network learns from validation identities too
    assert card["selected_epoch"] == plain["selected_epoch"] and card["validation"] == plain["validation"]
    assert set(ids["train"]) == set(plain["identities"]["train"]) | set(ids["validation"])
    assert not set(ids["holdout"]) & set(ids["train"])
    assert card["refit"]["epochs"] == card["selected_epoch"] and card["refit"]["of_schedule"] == 2
    assert card["refit"]["identities"] == 4 and card["refit"]["images"] == 16
    assert card["weights_sha256"] != plain["weights_sha256"]
    assert plain["refit"] is None
    # eval leaves out every identity the refit learned: only the holdout is measured
    from deer_reid.evaluation.run import never_trained_on

    kept, notes = never_trained_on(load_dataset(folder), ["refit"], settings)
    assert {s.identity for s in kept} == set(ids["holdout"]) and "4 identities" in notes["refit"]


def test_folds_choose_the_epoch_over_every_identity_then_train_on_all_and_resume_skips_folds_done(
        folder, tmp_path, monkeypatch):
    from deer_reid.evaluation.run import never_trained_on
    from deer_reid.training import train as training

    real = training_data.augment
    calls = {"n": 0, "stop_after": None}  # one augmentation per training step

    @functools.wraps(real)  # the card quotes the augmentation's docstring
    def counted(*a, **k):
        calls["n"] += 1
        if calls["stop_after"] is not None and calls["n"] > calls["stop_after"]:
            raise KeyboardInterrupt("power cut")
        return real(*a, **k)

    monkeypatch.setattr(training_data, "augment", counted)
    cfg = dict(TINY, epochs=2, holdout_identities=2, validation_identities=0, folds=2)
    settings = settings_for(tmp_path / "1")
    card = train(folder, TrainConfig(name="cv", **cfg), settings, progress=False)
    uninterrupted = calls["n"]
    ids, cross = card["identities"], card["cross_validation"]
    # each of the 4 training identities is validated on exactly once, never with the holdout
    validated = [set(f["validation_identities"]) for f in cross["per_fold"]]
    assert len(validated) == 2 and not validated[0] & validated[1]
    assert validated[0] | validated[1] == set(ids["train"]) and len(ids["train"]) == 4
    assert not set(ids["holdout"]) & set(ids["train"]) and ids["validation"] == []
    # the history is every validation query at once, epoch by epoch; the best epoch is chosen from it
    for epoch in range(3):
        per = [f["curve"][epoch]["validation"] for f in cross["per_fold"]]
        assert card["history"][epoch]["validation"] == training.pooled_figures(per)
        assert card["history"][epoch]["validation"]["queries"] == sum(v["queries"] for v in per) > 0
    chosen = max(card["history"][1:3], key=lambda h: (h["validation"]["top1"], h["validation"]["mAP"]))
    assert card["selected_epoch"] == chosen["epoch"] and card["validation"] == chosen["validation"]
    # the network shipped learned every training identity for the chosen number of epochs
    assert card["refit"]["identities"] == 4 and card["refit"]["epochs"] == card["selected_epoch"]
    kept, _ = never_trained_on(load_dataset(folder), ["cv"], settings)
    assert {s.identity for s in kept} == set(ids["holdout"])

    # stopped in the second fold, resumed: the first fold is not trained again, and the result is the same
    fold_one = cfg["epochs"] * (cross["per_fold"][0]["training_images"] // cfg["batch"])
    settings = settings_for(tmp_path / "2")
    calls.update(n=0, stop_after=fold_one + 1)
    with pytest.raises(KeyboardInterrupt):
        train(folder, TrainConfig(name="cv", **cfg), settings, progress=False)
    calls.update(n=0, stop_after=None)
    resumed = train(folder, TrainConfig(name="cv", **cfg, resume=True), settings, progress=False)
    assert calls["n"] == uninterrupted - fold_one
    assert resumed["weights_sha256"] == card["weights_sha256"]
    assert resumed["cross_validation"]["per_fold"][1]["curve"] == cross["per_fold"][1]["curve"]

    with pytest.raises(TrainError, match="replaces --validation-identities"):
        train(folder, TrainConfig(name="x", **dict(cfg, validation_identities=1)), settings, progress=False)
    with pytest.raises(DatasetError, match="folds need"):
        train(folder, TrainConfig(name="y", **dict(cfg, folds=9)), settings, progress=False)


def test_distillation_holds_the_embedding_near_the_imagenet_networks(folder, tmp_path):
    import torch
    from PIL import Image

    settings = settings_for(tmp_path)
    cfg = dict(TINY, epochs=2, lr=3e-3)
    free = train(folder, TrainConfig(name="free", **cfg), settings, progress=False)
    held = train(folder, TrainConfig(name="held", distill=100.0, **cfg), settings, progress=False)
    assert held["hyper_parameters"]["distill"] == 100.0 and free["hyper_parameters"]["distill"] == 0.0
    photos = np.stack([np.asarray(Image.open(s.path).convert("RGB").resize((64, 64)))
                       for s in load_dataset(folder)[:12]])
    spec = get_spec("efficientnet_lite0")

    def embedding(weights_file: Path) -> np.ndarray:
        net = spec.build()
        net.load_weights(torch.load(weights_file, map_location="cpu", weights_only=True))
        net.eval()
        x = (torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        with torch.inference_mode():
            return torch.nn.functional.normalize(net(x), dim=1).numpy()

    imagenet = embedding(resolve_weights(spec, settings.model_cache)[0])
    moved = {name: 1 - float((embedding(settings.model_cache / name / "model.pt") * imagenet).sum(1).mean())
             for name in ("free", "held")}
    assert moved["held"] < moved["free"]


def test_bad_training_inputs_are_clear_errors_or_reasoned_skips(folder, tmp_path):
    settings = settings_for(tmp_path)

    def one_identity(rows, _):
        return [r for r in rows if r["identity"] == rows[0]["identity"]]

    with pytest.raises(DatasetError, match="at least 2"):
        train(variant(folder, tmp_path / "one", one_identity), TrainConfig(name="x", **TINY), settings,
              progress=False)

    def unknown_view(rows, _):
        rows[0]["viewpoint"] = "upside-down"
        return rows

    with pytest.raises(DatasetError, match="upside-down"):
        train(variant(folder, tmp_path / "view", unknown_view), TrainConfig(name="x", **TINY), settings,
              progress=False)

    def single_photo_and_corrupt(rows, root):
        last = rows[-1]["identity"]
        rows = [r for r in rows if r["identity"] != last] + [r for r in rows if r["identity"] == last][:1]
        (root / rows[0]["path"]).write_bytes(b"\xff\xd8 not a jpeg")
        return rows

    card = train(variant(folder, tmp_path / "odd", single_photo_and_corrupt),
                 TrainConfig(name="odd", **{**TINY, "holdout_identities": 0}), settings, progress=False)
    assert list(card["identities"]["skipped"].values()) == ["one photo only"]
    assert len(card["unreadable_images"]) == 1 and "odd" in str(settings.model_cache / "odd")

    with pytest.raises(TrainError, match="built-in"):
        train(folder, TrainConfig(name="efficientnet_lite0", **TINY), settings, progress=False)
    with pytest.raises(TrainError, match="--overwrite"):
        train(folder, TrainConfig(name="odd", **TINY), settings, progress=False)
    with pytest.raises(TrainError, match="in use"):
        train(folder, TrainConfig(name="odd", **TINY, overwrite=True), settings, in_use={"odd"}, progress=False)
    with pytest.raises(TrainError, match="letters"):
        train(folder, TrainConfig(name="../evil", **TINY), settings, progress=False)


def test_eval_never_measures_a_model_on_identities_it_learned(folder, tmp_path):
    from deer_reid.evaluation.run import never_trained_on

    settings = settings_for(tmp_path)
    card = train(folder, TrainConfig(name="fair", **{**TINY, "holdout_identities": 2}), settings, progress=False)
    samples = load_dataset(folder)
    kept, notes = never_trained_on(samples, ["fair"], settings)
    assert {s.identity for s in kept} == set(card["identities"]["holdout"])
    assert "left out" in notes["fair"]
    # the ImageNet model measured on the same animals
    same, _ = never_trained_on(samples, ["efficientnet_lite0"], settings, holdout_of="fair")
    assert {s.identity for s in same} == set(card["identities"]["holdout"])
    assert [s.index for s in same] == list(range(len(same)))


@pytest.mark.stack
async def test_export_labels_writes_a_folder_train_and_eval_accept(stack, nyala_paths, tmp_path):
    from deer_reid.training.labels import ExportError, export_labels
    from tests.stack_helpers import ingest
    from deer_reid.ingest import wait_terminal

    ids = await ingest(stack, nyala_paths[790:796], "export-cam", cls="doe")
    await wait_terminal(stack.api_url, ids, timeout=300, progress=False)
    report = await export_labels(stack.dsn, tmp_path / "labels", prop="export-cam")
    samples = load_dataset(tmp_path / "labels")
    assert report["detections"] == len(samples) > 0
    assert {s.identity for s in samples} and all(s.identity.startswith("export-cam-") for s in samples)
    assert all(s.cls.value == "doe" for s in samples)  # sex.csv carries the individuals' sex
    rows = list(csv.DictReader(open(tmp_path / "labels" / "metadata.csv")))
    assert {r["decided_by"] for r in rows} == {"fusion"} and {r["site"] for r in rows} == {"export-cam"}
    with pytest.raises(ExportError, match="not empty"):
        await export_labels(stack.dsn, tmp_path / "labels", prop="export-cam")
    with pytest.raises(ExportError, match="by a person"):
        await export_labels(stack.dsn, tmp_path / "human", prop="export-cam", human_only=True)


def test_random_erasing_hides_one_rectangle_and_leaves_runs_without_it_unchanged():
    import torch

    batch = torch.full((6, 3, 40, 40), 128, dtype=torch.uint8)
    plain = training_data.augment(batch, 32, torch.Generator().manual_seed(5))
    again = training_data.augment(batch, 32, torch.Generator().manual_seed(5), 0.0)
    assert torch.equal(plain, again)  # erase 0 draws nothing more: older recipes replay the same
    erased = training_data.augment(batch, 32, torch.Generator().manual_seed(5), 1.0)
    assert torch.equal(erased, training_data.augment(batch, 32, torch.Generator().manual_seed(5), 1.0))
    for seed in range(8):  # one image at a time: the erasing's draws shift the next image's
        one = batch[:1]
        ref = training_data.augment(one, 32, torch.Generator().manual_seed(seed))[0]
        img = training_data.augment(one, 32, torch.Generator().manual_seed(seed), 1.0)[0]
        changed = (img != ref).any(dim=0)
        rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        assert changed.any()
        # the changed pixels lie in one rectangle of 2-33% of the image (a noise pixel may match by chance)
        box = int((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
        assert 0.02 * 32 * 32 * 0.5 <= box <= 0.34 * 32 * 32, (seed, box)
        assert int(changed.sum()) >= 0.9 * box


def test_a_soup_averages_fine_tunes_of_one_split_and_keeps_only_what_validation_rewards(folder, tmp_path):
    import torch

    from deer_reid.training.soup import average, soup

    settings = settings_for(tmp_path)
    cache = settings.model_cache
    a = train(folder, TrainConfig(name="a", **TINY), settings, progress=False)
    b = train(folder, TrainConfig(name="b", **{**TINY, "lr": 3e-3, "erase": 0.5}), settings, progress=False)
    card = soup("ab", ["a", "b"], settings, progress=False)
    steps = card["soup"]["steps"]
    # the better ingredient alone first, the other tried on top, kept only if validation improved
    alone = {n: card["soup"]["ingredients"][n]["validation"] for n in ("a", "b")}
    first = max(("a", "b"), key=lambda n: (alone[n]["top1"], alone[n]["mAP"]))
    assert steps[0]["ingredient"] == first and steps[1]["ingredient"] != first
    tried = steps[1]["validation"]
    assert steps[1]["kept"] == ((tried["top1"], tried["mAP"]) > (alone[first]["top1"], alone[first]["mAP"]))
    assert card["soup"]["kept"] == [first] + ([steps[1]["ingredient"]] if steps[1]["kept"] else [])
    # the weights are the mean of the kept ingredients', and the soup keeps their identities' split
    weights = torch.load(cache / "ab" / "model.pt", weights_only=True)
    parts = [torch.load(cache / n / "model.pt", weights_only=True) for n in card["soup"]["kept"]]
    key = next(k for k, v in weights.items() if torch.is_floating_point(v))
    assert torch.allclose(weights[key], torch.stack([p[key] for p in parts]).mean(0))
    assert card["identities"] == a["identities"] == b["identities"]
    model = load_model("ab", cache)
    assert model.version == card["embedding_version"] and get_spec("ab", cache).input_size == 64
    assert torch.equal(average([parts[0], parts[0]])[key], parts[0][key])

    # what cannot be souped is refused with the reason
    train(folder, TrainConfig(name="other-split", **{**TINY, "seed": 1}), settings, progress=False)
    train(folder, TrainConfig(name="bigger", **{**TINY, "input_size": 72}), settings, progress=False)
    with pytest.raises(TrainError, match="split the identities differently"):
        soup("x", ["a", "other-split"], settings, progress=False)
    with pytest.raises(TrainError, match="input size"):
        soup("x", ["a", "bigger"], settings, progress=False)
    with pytest.raises(TrainError, match="at least two"):
        soup("x", ["a"], settings, progress=False)
    with pytest.raises(TrainError, match="not a body network"):
        soup("x", ["a", "efficientnet_lite0"], settings, progress=False)
    with pytest.raises(TrainError, match="exists"):
        soup("ab", ["a", "b"], settings, progress=False)
    with pytest.raises(TrainError, match="one of the ingredients"):
        soup("a", ["a", "b"], settings, overwrite=True, progress=False)
