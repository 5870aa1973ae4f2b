"""The body models alone on the bench's crops (synthetic, or photos), and the machine: its CPU model, and the matmul peak the models'
GFLOP/s are read against."""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable

import numpy as np

from shared.config import Settings


def cpu_model() -> str:
    """The processor's model name, as /proc/cpuinfo (x86) or lscpu (elsewhere) give it."""
    import platform
    import subprocess

    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 1.0) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e9


def gflop_per_image(model) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, model.spec.input_size, model.spec.input_size)
    network = model.spec.build().eval()  # the same operations whatever engine runs them, counted in torch
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(x)
    return counter.get_total_flops() / 1e9


def synthetic_crops(n: int, seed: int = 0, size: tuple[int, int] = (480, 360)) -> list[bytes]:
    """Smooth random pictures as JPEG crops: the decoder and models do the same work as on photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=90)
        crops.append(out.getvalue())
    return crops


def photo_crops(folder: Path, n: int, seed: int = 0) -> list[bytes]:
    """n crops from the photos under `folder`, in a seeded order. Real animals give the coat's keypoint
    matchers their real work (a smooth synthetic picture gives RootSIFT about 300 keypoints and few matches,
    a 512-px nyala photo about 1,100). Beyond the folder's count the photos come again, each as a distinct
    image (the soak's `distinct_image`), so that no two detections are byte-identical."""
    from deer_reid.ingest import find_files
    from deer_reid.soak import distinct_image
    from shared.archives import IMAGE_SUFFIXES

    photos = [p for p in find_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not photos:
        raise FileNotFoundError(f"no photos under {folder}")
    order = np.random.default_rng(seed).permutation(len(photos))
    chosen = [photos[order[k % len(photos)]] for k in range(n)]
    return [p.read_bytes() if k < len(photos) else distinct_image(p.read_bytes(), k) for k, p in enumerate(chosen)]


def bench_crops(n: int, photos: Path | None) -> tuple[list[bytes], dict]:
    """The bench's n crops, from `photos` when given, else synthetic; and what they were, for the report."""
    if photos is None:
        return synthetic_crops(n), {"source": "synthetic", "size": [480, 360]}
    return photo_crops(photos, n), {"source": "photos", "folder": str(photos)}


def bare_throughput(extractor, crops: list[bytes], batch: int = 16) -> float:
    extractor.embed(crops[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(crops), batch):
        extractor.embed(crops[i:i + batch])
    return len(crops) / (time.perf_counter() - start)


def measure_bare(names: list[str], crops: list[bytes], settings: Settings, allow_random: bool,
                 progress: Callable[[str], None]) -> tuple[dict, float]:
    """The report's bare figures, and the models' GFLOP per detection unrounded (the achieved GFLOP/s are
    computed from it). The models are let go on return, before the stack's services load their own."""
    from services.body.extractor import BodyExtractor
    from shared.models import load_configured

    models = [load_configured(n, settings, allow_random=allow_random) for n in names]
    figures: dict = {"weights_real": not any(m.random_weights for m in models),
                     "precision": {m.spec.name: m.precision for m in models},
                     "engine": {m.spec.name: m.engine for m in models}}
    gflop = sum(gflop_per_image(m) for m in models)
    figures["gflop_per_det"] = round(gflop, 2)
    per_model_crops = crops[: max(64, len(crops) // 4)]
    bare_crops = crops[: min(len(crops), 256)]
    progress(f"bare models: each alone on {len(per_model_crops)} crops, then the extractor of "
             f"{'+'.join(names)} on {len(bare_crops)} crops, three times ...")
    figures["bare_per_model_det_per_s"] = {
        m.spec.name: round(bare_throughput(BodyExtractor([m], batch=settings.batch_max), per_model_crops,
                                           settings.batch_max), 1)
        for m in models}
    # This machine's speed wanders from minute to minute: the baseline is the best of three runs,
    # which makes the e2e/bare ratio conservative.
    runs = [bare_throughput(BodyExtractor(models, batch=settings.batch_max), bare_crops, settings.batch_max)
            for _ in range(3)]
    figures["bare_runs_det_per_s"] = [round(r, 2) for r in runs]
    figures["bare_det_per_s"] = round(max(runs), 2)
    return figures, gflop
