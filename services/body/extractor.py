"""Body appearance: crops in, one embedding per configured model out (pure compute, no I/O)."""
from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from shared.images import model_input
from shared.models import LoadedModel
from shared.schemas import Embedding

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def embed_in_batches(embed: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int,
                     on_oom: Callable[[], None] = lambda: None) -> tuple[np.ndarray, int]:
    """Embed `images` in chunks of `batch`; on out-of-memory halve the chunk and retry, never drop work.

    Returns the embeddings and the batch size that finally fit (the caller keeps it for next time).
    """
    out: list[np.ndarray] = []
    start = 0
    while start < len(images):
        chunk = images[start:start + batch]
        try:
            out.append(embed(chunk))
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
            if not is_out_of_memory(exc) or batch == 1:
                raise
            batch = max(1, batch // 2)
            log.warning("out of memory: batch halved to %d", batch)
            on_oom()
            continue
        start += len(chunk)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32), batch


class BodyExtractor:
    """Embeds detection crops with each model of the ensemble (one model in fast mode)."""

    def __init__(self, models: Sequence[LoadedModel], batch: int = 16):
        if not models:
            raise ValueError("the body extractor needs at least one model")
        self.models = list(models)
        self.batch = batch

    @property
    def random_weights(self) -> bool:
        return any(m.random_weights for m in self.models)

    def embed(self, crops: Sequence[bytes], names: Sequence[str] | None = None) -> list[list[Embedding] | str]:
        """For each crop: its embeddings (one per model, all models or those named), or why it could not be read."""
        results: list[list[Embedding] | str] = [[] for _ in crops]
        inputs: dict[int, list[np.ndarray | str]] = {}  # by input size: models of one size share the decode
        for model in self.models:
            if names is not None and model.spec.name not in names:
                continue
            size = model.spec.input_size
            if size not in inputs:
                inputs[size] = list(_decoder_pool().map(lambda crop: _decoded(crop, size), crops))
            arrays, ok = [], []
            for i, decoded in enumerate(inputs[size]):
                if isinstance(results[i], str):
                    continue  # already failed with another model's input size
                if isinstance(decoded, str):
                    results[i] = decoded  # an undecodable crop fails only its own detection
                else:
                    arrays.append(decoded)
                    ok.append(i)
            if not ok:
                continue
            vectors, self.batch = embed_in_batches(model.embed, np.stack(arrays), self.batch, _empty_cuda_cache)
            for i, vec in zip(ok, vectors):
                results[i].append(Embedding.of(model.spec.name, model.version, vec, model.random_weights))
        return results


@functools.cache
def _decoder_pool() -> ThreadPoolExecutor:
    """One pool per process for crop decoding: JPEG decoding and resizing release the GIL, so a
    batch's crops spread over every core instead of leaving all but one idle between two
    inference calls (2 ms per crop here)."""
    return ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix="body-decode")


def _decoded(crop: bytes, size: int) -> np.ndarray | str:
    """The model input of one crop, or why it could not be read."""
    try:
        return model_input(crop, size)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder says, it is about this crop alone
        return f"undecodable crop: {exc}"


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
