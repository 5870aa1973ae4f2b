"""Embeddings of a labelled folder made by the services' own code path, cached by image and version.

The path is the pipeline's: the upload decoder, the API's crop (whole image, long
side <= crop_max_side, JPEG), then the body extractor with the registry's models.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from deer_reid.evaluation.dataset import Sample
from services.body.extractor import BodyExtractor
from shared.config import Settings
from shared.images import crop_jpeg, decode_upload
from shared.models import LoadedModel, load_configured


def pipeline_crop(data: bytes, settings: Settings) -> bytes:
    decoded = decode_upload(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
    return crop_jpeg(decoded.image, (0, 0, decoded.width, decoded.height), settings.crop_max_side)


def _cache_file(cache: Path, version: str, settings: Settings) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{version}_crop{settings.crop_max_side}")
    return cache / f"{safe}.npz"


def embed_samples(samples: Sequence[Sample], model_names: Sequence[str], settings: Settings, *,
                  allow_random: bool = False, cache: Path | None = None, progress: bool = True,
                  chunk: int = 32) -> tuple[dict[str, np.ndarray], list[LoadedModel]]:
    """{model name: (N, dim) L2-normalised embeddings} for the samples, and the loaded models."""
    cache = cache or settings.model_cache.parent / "features"
    cache.mkdir(parents=True, exist_ok=True)
    models = [load_configured(n, settings, allow_random=allow_random) for n in model_names]
    shas = [hashlib.sha256(s.path.read_bytes()).hexdigest() for s in samples]
    out: dict[str, np.ndarray] = {}
    for model in models:
        runs_on = model.spec.runtime if model.engine == "torch" else model.engine  # each engine rounds its own way
        file = _cache_file(cache, f"{model.version}_{model.precision}_{runs_on}", settings)
        known: dict[str, np.ndarray] = {}
        if file.exists() and not model.random_weights:
            with np.load(file) as z:
                known = dict(zip(z["sha"].tolist(), z["vec"]))
        todo = [i for i, sha in enumerate(shas) if sha not in known]
        extractor = BodyExtractor([model], batch=settings.batch_max)
        bar = tqdm(total=len(todo), desc=f"embed {model.spec.name}", unit="img", disable=not progress)
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            crops = [pipeline_crop(samples[i].path.read_bytes(), settings) for i in idx]
            for i, result in zip(idx, extractor.embed(crops)):
                if isinstance(result, str):
                    raise ValueError(f"{samples[i].path}: {result}")
                known[shas[i]] = result[0].array()
            bar.update(len(idx))
        bar.close()
        if todo and not model.random_weights:
            np.savez(file, sha=np.array(list(known)), vec=np.stack(list(known.values())))
        out[model.spec.name] = np.stack([known[sha] for sha in shas]).astype(np.float32)
    return out, models
