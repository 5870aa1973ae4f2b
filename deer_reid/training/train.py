"""The training loop: fine-tune a body network from its ImageNet weights with sub-center ArcFace.

- Identities are split three ways (`data.split`): training, validation (chooses the epoch) and a
  holdout that neither training nor selection ever sees; `deer-reid eval` reports on the holdout.
- Classes are identity x viewpoint where the data has viewpoints (two flanks, two patterns).
- Inputs are the pipeline's own crops (the API's whole-image crop, long side 512, JPEG), squashed to
  the input size exactly as the body service feeds them, so the model learns what it will be shown.
- Deterministic for a seed on one machine and thread count: seeded splits, order and augmentation.
- A checkpoint after every epoch (`--resume` continues); the result is written into the model cache
  as a model like any other: weights, checksum, and a card with everything needed to trust it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deer_reid.evaluation.dataset import DatasetError, Sample, load_dataset
from deer_reid.evaluation.features import pipeline_crop
from deer_reid.evaluation.metrics import retrieval
from deer_reid.training import data
from shared.config import Settings
from shared.images import ImageRejected, model_input
from shared.models import CARD_FILE, REGISTRY, TRAINED_WEIGHTS, cpu_has_bf16, get_spec, resolve_weights, sha256_of

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
TRAINABLE_BASES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


class TrainError(ValueError):
    """Training cannot start or go on; the message names the fix."""


@dataclass
class TrainConfig:
    name: str
    base: str = "efficientnet_lite0"
    epochs: int = 12
    input_size: int = 224
    seed: int = 0
    holdout_identities: int = 58
    validation_identities: int = 15
    batch: int = 32
    lr: float = 3e-4  # backbone
    head_lr: float = 3e-3  # ArcFace centres start from nothing
    weight_decay: float = 1e-4
    subcenters: int = 3
    margin: float = 0.3
    scale: float = 30.0
    by_viewpoint: bool = True  # identity x viewpoint classes where the data has viewpoints
    # fp32: bf16 autocast trained no faster on this 2-core AMX CPU (Lite0, batch 32, forward+backward:
    # 17.3 vs 16.8 img/s at 224 px, 9.1 vs 8.9 at 288); "auto" takes bf16 where the CPU has it natively.
    precision: str = "fp32"
    # Average the weights of every epoch from this one on (0: off), batch-norm statistics recomputed on
    # the training images; the average is kept only when it beats the best single epoch on validation.
    # Validation peaked early and then fell while the loss kept dropping: averaging the epochs around the
    # peak is one network (fast mode) that behaves like an ensemble of them.
    average_from: int = 0
    # Random erasing: the share of training images with one rectangle replaced by noise (0: off).
    erase: float = 0.0
    # After choosing the epoch on validation, train again on training + validation identities and stop there
    # (the usual last step once selection is done): the final network learns from every identity not held out.
    refit: bool = False
    # Keep the ImageNet embedding in view: this weight times the mean cosine distance between the network's
    # embedding of a training image and the frozen ImageNet network's (0: off). Fine-tuning on a hundred
    # animals forgets some of what ImageNet features got right on animals it never saw; this holds it back.
    distill: float = 0.0
    # Choose the epoch by K-fold cross-validation over every identity not held out (0: off, the single
    # validation split), then train once on all of them for that many epochs. Fifteen validation animals
    # cannot tell epochs or recipes apart (one query moves top-1 by 0.0065, while thirteen recipes differed
    # by less than one confidence interval on the holdout); K folds validate on every animal and still leave
    # them all to the final network.
    folds: int = 0
    overwrite: bool = False
    resume: bool = False


def check_name(cfg: TrainConfig, cache: Path, in_use: set[str]) -> Path:
    """The model's folder; refuses names that would replace a built-in model or one a stack is running."""
    if not cfg.name or not all(c.isalnum() or c in "-_." for c in cfg.name) or cfg.name.startswith("."):
        raise TrainError(f"--name {cfg.name!r} must be letters, digits, '-', '_' or '.'")
    if cfg.name in REGISTRY:
        raise TrainError(f"--name {cfg.name!r} is a built-in model; choose another name")
    if cfg.base not in TRAINABLE_BASES:
        raise TrainError(f"--base must be one of {', '.join(TRAINABLE_BASES)} (models with offline ImageNet weights)")
    folder = Path(cache) / cfg.name
    if (folder / CARD_FILE).exists() and not cfg.resume:
        if cfg.name in in_use:
            raise TrainError(f"model {cfg.name!r} is in use by the running stack; stop it or choose another name")
        if not cfg.overwrite:
            raise TrainError(f"model {cfg.name!r} exists in {folder}; --overwrite replaces it")
    return folder


def _folder_checksum(samples: list[Sample], root: Path) -> str:
    digest = hashlib.sha256((Path(root) / "metadata.csv").read_bytes())
    for s in samples:
        digest.update(s.path.read_bytes())
    return digest.hexdigest()


def _load_images(samples: list[Sample], size: int, settings: Settings, progress: bool) -> tuple[list, dict]:
    """Each sample's pipeline crop decoded at `size` (uint8 HWC), or a reason it cannot be read."""
    images, bad = [], {}
    for s in tqdm(samples, desc=f"decode {size}px", unit="img", disable=not progress):
        try:
            images.append(model_input(pipeline_crop(s.path.read_bytes(), settings), size))
        except (ImageRejected, OSError, ValueError) as exc:
            images.append(None)
            bad[str(s.path)] = str(exc)
    return images, bad


def network_input(batch, spec):
    """A uint8 (N, 3, H, W) tensor as the network takes it: scaled, normalised by the spec, channels-last."""
    import torch

    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return ((batch.float().div_(255) - mean) / std).contiguous(memory_format=torch.channels_last)


def validation_figures(net, x_val: np.ndarray | None, val_samples: list[Sample], spec, precision: str) -> dict:
    """Leave-one-encounter-out retrieval among the validation photos (uint8 HWC at the input size): what
    chooses an epoch, an average or a soup. Empty when there is nothing to validate on."""
    import torch

    if x_val is None:
        return {}
    net.eval()
    feats = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for start in range(0, len(x_val), 64):
            xb = network_input(torch.from_numpy(x_val[start:start + 64]).permute(0, 3, 1, 2), spec)
            feats.append(torch.nn.functional.normalize(net(xb).float(), dim=1))
    e = torch.cat(feats).numpy()
    r = retrieval(e @ e.T, [s.identity for s in val_samples], [s.encounter for s in val_samples])
    return {k: r[k] for k in ("queries", "top1", "top5", "mAP")}


def better(a: dict, b: dict | None) -> bool:
    """Validation figures `a` beat `b` (None: nothing yet): top-1 first, mAP to break ties."""
    return b is None or (a.get("top1", 0), a.get("mAP", 0)) > (b.get("top1", 0), b.get("mAP", 0))


def _resumed(cfg: TrainConfig, checkpoint: Path) -> dict:
    """The checkpoint's state, if the run that wrote it had the same settings."""
    import torch

    if not checkpoint.exists():
        raise TrainError(f"--resume: no checkpoint in {checkpoint.parent}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)

    def settled(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in ("resume", "overwrite")}

    if settled(state["config"]) != settled(asdict(cfg)):
        raise TrainError("--resume needs the same settings as the run that wrote the checkpoint")
    return state


def pooled_figures(per_fold: list[dict]) -> dict:
    """One epoch's validation figures over all folds, each fold weighted by its queries (the figures of
    every validation query at once)."""
    queries = sum(v.get("queries", 0) for v in per_fold)
    if not queries:
        return {"queries": 0}
    return {"queries": queries, **{m: sum(v[m] * v["queries"] for v in per_fold if v.get("queries")) / queries
                                   for m in ("top1", "top5", "mAP")}}


def cross_validate(fit, samples: list[Sample], images: list, cfg: TrainConfig, settings: Settings, folder: Path,
                   spec, precision: str, imagenet_network, progress: bool) -> tuple[list, dict, dict]:
    """K-fold choice of the epoch: for each fold, `fit` on the other folds' identities over the whole
    schedule and measure every epoch on the fold's own. The epoch whose figures over all validation queries
    are best is chosen (`better`). A checkpoint after each fold lets `--resume` skip the folds done.
    Returns the card's history (per epoch, over all folds), the chosen entry and the per-fold record."""
    import torch

    image_of = {str(s.path): im for s, im in zip(samples, images)}
    checkpoint = folder / CHECKPOINT
    done = _resumed(cfg, checkpoint)["folds"] if cfg.resume else []
    for i, (fold_train, fold_val) in enumerate(data.folds(samples, cfg.folds, cfg.seed)):
        if i < len(done):
            continue
        t0 = time.monotonic()
        val_images, _ = _load_images(fold_val, cfg.input_size, settings, progress)  # all decoded once already
        x_val = np.stack(val_images)
        curve = [{"epoch": 0, "validation": validation_figures(imagenet_network(), x_val, fold_val, spec, precision)}]

        def measure(epoch: int, loss: float, net, curve=curve, x_val=x_val, fold_val=fold_val, i=i):
            val = validation_figures(net, x_val, fold_val, spec, precision)
            curve.append({"epoch": epoch, "loss": round(loss, 4), "validation": val})
            if progress:
                tqdm.write(f"fold {i + 1} epoch {epoch}: loss {loss:.3f}, validation top-1 {val.get('top1', 0):.3f} "
                           f"({val.get('queries', 0)} queries)")

        fit(fold_train, [image_of[str(s.path)] for s in fold_train], cfg.epochs, f"fold {i + 1}/{cfg.folds} epoch",
            measure)
        done.append({"fold": i + 1, "validation_identities": sorted({s.identity for s in fold_val}),
                     "training_images": len(fold_train), "curve": curve, "seconds": round(time.monotonic() - t0, 1)})
        torch.save({"config": asdict(cfg), "folds": done}, checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)
    history = []
    for epoch in range(cfg.epochs + 1):
        entry = {"epoch": epoch, "validation": pooled_figures([f["curve"][epoch]["validation"] for f in done])}
        if epoch:
            entry["loss"] = round(float(np.mean([f["curve"][epoch]["loss"] for f in done])), 4)
        else:
            entry["note"] = "ImageNet weights, before training"
        history.append(entry)
    if not history[0]["validation"]["queries"]:
        raise TrainError("no fold has an animal photographed in two encounters: nothing to validate on")
    best = None
    for entry in history[1:]:
        if better(entry["validation"], best and best["validation"]):
            best = {"epoch": entry["epoch"], "validation": entry["validation"]}
    if progress:
        tqdm.write(f"{cfg.folds} folds choose epoch {best['epoch']}: validation top-1 "
                   f"{best['validation']['top1']:.3f} over {best['validation']['queries']} queries")
    return history, best, {"folds": cfg.folds, "per_fold": done}


def train(data_dir: Path, cfg: TrainConfig, settings: Settings, *, in_use: set[str] = frozenset(),
          progress: bool = True) -> dict:
    import torch

    started = time.monotonic()
    folder = check_name(cfg, settings.model_cache, set(in_use))
    if cfg.folds and (cfg.validation_identities or cfg.refit or cfg.average_from):
        raise TrainError("--folds validates on every training identity in turn and then trains on all of them: "
                         "it replaces --validation-identities and --refit, and does not average epochs")
    samples = load_dataset(data_dir)
    data.check_viewpoints(samples)
    parts = data.split(samples, holdout=cfg.holdout_identities, validation=cfg.validation_identities, seed=cfg.seed)
    by_viewpoint = cfg.by_viewpoint and all(s.viewpoint for s in parts.train)
    spec = get_spec(cfg.base)
    threads = settings.torch_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cpu_has_bf16() else "fp32")

    pre = int(round(cfg.input_size / 0.85))  # augmentation crops 70-100%: keep resolution to spare
    train_images, bad_train = _load_images(parts.train, pre, settings, progress)
    val_images, bad_val = _load_images(parts.validation, cfg.input_size, settings, progress)
    keep = [i for i, im in enumerate(train_images) if im is not None]
    train_samples = [parts.train[i] for i in keep]
    labels, classes = data.class_labels(train_samples, by_viewpoint)
    if len(classes) < 2:
        raise DatasetError("fewer than 2 readable training classes")
    x_train = torch.from_numpy(np.stack([train_images[i] for i in keep])).permute(0, 3, 1, 2).contiguous()
    y_train = torch.from_numpy(labels)
    val_keep = [i for i, im in enumerate(val_images) if im is not None]
    val_samples = [parts.validation[i] for i in val_keep]
    x_val = np.stack([val_images[i] for i in val_keep]) if val_keep else None

    found = resolve_weights(spec, settings.model_cache)
    if found is None:
        raise TrainError(f"no ImageNet weights for {cfg.base} in {settings.model_cache}")

    def imagenet_network():
        net = spec.build()
        net.load_weights(torch.load(found[0], map_location="cpu", weights_only=True))
        return net.to(memory_format=torch.channels_last)

    def fresh(n_classes: int, n_images: int):
        """The network from its ImageNet weights, a new head, the optimiser and its schedule (warm-up, then
        cosine over `cfg.epochs` epochs of `n_images`)."""
        from deer_reid.training.arcface import SubCenterArcFace

        torch.manual_seed(cfg.seed)
        net = imagenet_network()
        arc = SubCenterArcFace(spec.dim, n_classes, cfg.subcenters, cfg.scale, cfg.margin)
        opt = torch.optim.AdamW([{"params": net.parameters(), "lr": cfg.lr},
                                 {"params": arc.parameters(), "lr": cfg.head_lr}], weight_decay=cfg.weight_decay)
        per_epoch = max(1, n_images // cfg.batch)
        total = per_epoch * cfg.epochs
        warmup = min(per_epoch, total // 4 + 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
            1 + np.cos(np.pi * min(1.0, max(0, step - warmup) / max(1, total - warmup)))))
        return net, arc, opt, sched, per_epoch

    module, head, optimizer, schedule, steps_per_epoch = fresh(len(classes), len(keep))
    teacher = None
    if cfg.distill > 0:
        teacher = imagenet_network()
        # normalised by batch statistics as the student is (train mode), without the student's random
        # drop-connect: at the start the two agree, and the distance measures what training moved
        teacher.net._global_params = teacher.net._global_params._replace(drop_connect_rate=None)
        teacher = teacher.train().requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    history, best, first_epoch = [], None, 0
    averaged = torch.optim.swa_utils.AveragedModel(module) if cfg.average_from else None
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / CHECKPOINT
    if cfg.resume and not cfg.folds:
        state = _resumed(cfg, checkpoint)
        module.load_state_dict(state["module"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # drop-connect draws from the global generator
        history, best, first_epoch = state["history"], state["best"], state["epoch"] + 1
        if averaged is not None and state.get("averaged") is not None:
            averaged.load_state_dict(state["averaged"])
    def validate(net=None) -> dict:
        return validation_figures(net or module, x_val, val_samples, spec, precision)

    if first_epoch == 0 and not cfg.folds:
        baseline = validate()
        history.append({"epoch": 0, "validation": baseline, "note": "ImageNet weights, before training"})

    def run_epoch(net, arc, opt, sched, per_epoch: int, x, y, gen, desc: str) -> float:
        """One pass over the training images in a seeded order; the mean loss."""
        net.train()
        arc.train()
        order = torch.randperm(len(x), generator=gen)
        losses = []
        bar = tqdm(range(per_epoch), desc=desc, unit="batch", disable=not progress)
        for step in bar:
            idx = order[step * cfg.batch:(step + 1) * cfg.batch]
            xb = network_input(data.augment(x[idx], cfg.input_size, gen, cfg.erase), spec)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                embedded = net(xb)
                loss = arc(embedded, y[idx])
                if teacher is not None:
                    with torch.no_grad():
                        target = torch.nn.functional.normalize(teacher(xb).float(), dim=1)
                    drift = 1 - (torch.nn.functional.normalize(embedded.float(), dim=1) * target).sum(1).mean()
                    loss = loss + cfg.distill * drift
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        return float(np.mean(losses))

    def fit(fit_samples: list[Sample], images: list, epochs: int, desc: str, after_epoch=None):
        """A network trained afresh from the ImageNet weights on `fit_samples` (their images at the
        pre-crop size) for `epochs` epochs of the `cfg.epochs` schedule: stopping early in the same schedule
        is how an epoch chosen on validation is reproduced on more identities."""
        fit_labels, fit_classes = data.class_labels(fit_samples, by_viewpoint)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        net, arc, opt, sched, per_epoch = fresh(len(fit_classes), len(fit_samples))
        gen = torch.Generator().manual_seed(cfg.seed)
        for epoch in range(epochs):
            loss = run_epoch(net, arc, opt, sched, per_epoch, x, torch.from_numpy(fit_labels), gen,
                             f"{desc} {epoch + 1}/{epochs}")
            if after_epoch is not None:
                after_epoch(epoch + 1, loss, net)
        return net, len(fit_classes)

    cross = None
    if cfg.folds:
        first_epoch = cfg.epochs  # the folds chose the epoch: the single-split loop below has nothing to do
        history, best, cross = cross_validate(fit, train_samples, [train_images[i] for i in keep], cfg, settings,
                                              folder, spec, precision, imagenet_network, progress)
    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.monotonic()
        loss = run_epoch(module, head, optimizer, schedule, steps_per_epoch, x_train, y_train, generator,
                         f"epoch {epoch + 1}/{cfg.epochs}")
        val = validate()
        entry = {"epoch": epoch + 1, "loss": round(loss, 4), "validation": val,
                 "seconds": round(time.monotonic() - t0, 1)}
        history.append(entry)
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {entry['loss']:.3f}, validation top-1 {val.get('top1', 0):.3f} "
                       f"top-5 {val.get('top5', 0):.3f} ({entry['seconds']} s)")
        if better(val, best and best["validation"]):
            best = {"epoch": epoch + 1, "validation": val}
            torch.save(module.net.state_dict(), folder / "best.pt")
        if averaged is not None and epoch + 1 >= cfg.average_from:
            averaged.update_parameters(module)
        torch.save({"config": asdict(cfg), "module": module.state_dict(), "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                    "best": best, "epoch": epoch, "averaged": averaged.state_dict() if averaged else None},
                   checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)

    if averaged is not None and int(averaged.n_averaged) > 0:
        # batch-norm statistics of the averaged weights, from the training images (augmented as in training)
        batches = [network_input(data.augment(x_train[k:k + cfg.batch], cfg.input_size, generator), spec)
                   for k in range(0, len(keep), cfg.batch)]
        torch.optim.swa_utils.update_bn(batches, averaged)
        val = validate(averaged.module)
        entry = {"epoch": f"average of epochs {cfg.average_from}-{cfg.epochs}", "validation": val,
                 "epochs_averaged": int(averaged.n_averaged)}
        history.append(entry)
        if progress:
            tqdm.write(f"{entry['epoch']}: validation top-1 {val.get('top1', 0):.3f} top-5 {val.get('top5', 0):.3f}")
        if better(val, best and best["validation"]):
            best = {"epoch": entry["epoch"], "validation": val}
            torch.save(averaged.module.net.state_dict(), folder / "best.pt")
    refit = None
    if cfg.folds or (cfg.refit and best and isinstance(best["epoch"], int) and parts.validation):
        # The epoch count is chosen; the validation identities have done their work. Train once more from the
        # ImageNet weights on training + validation identities, the same schedule, stopped at the chosen epoch:
        # more animals to learn from, and the holdout is still unseen. Nothing is left to measure this network
        # on but the holdout, so its card keeps the selection's validation figures. (With folds every
        # non-holdout identity is already a training one, and this is the only network trained on them all.)
        t0 = time.monotonic()
        photos = Counter(s.identity for s in parts.validation)
        more = [s for s in parts.validation if photos[s.identity] >= 2]
        more_images, bad_more = _load_images(more, pre, settings, progress)
        bad_val.update(bad_more)
        refit_images = [train_images[i] for i in keep] + [im for im in more_images if im is not None]
        refit_samples = train_samples + [s for s, im in zip(more, more_images) if im is not None]
        net, n_classes = fit(refit_samples, refit_images, best["epoch"], "refit")
        torch.save(net.net.state_dict(), folder / "best.pt")
        refit = {"epochs": best["epoch"], "of_schedule": cfg.epochs, "images": len(refit_samples),
                 "identities": len({s.identity for s in refit_samples}), "classes": n_classes,
                 "seconds": round(time.monotonic() - t0, 1)}
        history.append({"epoch": f"refit on {refit['identities']} identities, {best['epoch']} epochs",
                        "seconds": refit["seconds"]})
        if progress:
            tqdm.write(f"refit: {refit['epochs']} epochs on {refit['identities']} identities ({refit['seconds']} s)")
    weights = folder / TRAINED_WEIGHTS
    shutil.copyfile(folder / "best.pt", weights.with_suffix(".partial"))
    weights.with_suffix(".partial").replace(weights)
    checksum = sha256_of(weights)
    card = {
        "kind": "deer-reid-model-card", "name": cfg.name, "base": cfg.base, "input_size": cfg.input_size,
        "dim": spec.dim, "weights_file": TRAINED_WEIGHTS, "weights_sha256": checksum,
        "embedding_version": f"{cfg.name}:{checksum[:12]}:{replace(spec, input_size=cfg.input_size).preprocessing}",
        "created_at": datetime.now(timezone.utc).isoformat(),
        "data": {"folder": str(Path(data_dir).resolve()), "checksum": _folder_checksum(samples, Path(data_dir)),
                 "images": len(samples), "identities": len({s.identity for s in samples})},
        "identities": {"train": sorted({s.identity for s in refit_samples}) if refit else parts.identities("train"),
                       "validation": parts.identities("validation"),
                       "holdout": parts.identities("holdout"), "skipped": parts.skipped},
        "unreadable_images": {**bad_train, **bad_val},
        "classes": len(classes), "classes_by": "identity x viewpoint" if by_viewpoint else "identity",
        "hyper_parameters": {k: v for k, v in asdict(cfg).items() if k not in ("name", "overwrite", "resume")},
        "precision": precision, "threads": threads, "machine": platform.processor() or platform.machine(),
        "selected_epoch": best["epoch"] if best else None, "refit": refit,
        "cross_validation": cross,
        "validation": best["validation"] if best else None,
        "history": history, "seconds": round(time.monotonic() - started, 1),
        "loss": f"sub-center ArcFace, {cfg.subcenters} centres per class" if cfg.subcenters > 1 else "ArcFace",
        "augmentation": data.augment.__doc__.split(":", 1)[1].strip(),
    }
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2))
    return card
