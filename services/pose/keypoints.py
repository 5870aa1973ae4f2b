"""AP-10K keypoints with MMPose: the model, its checksummed weights in the model cache, batched top-down
inference on detection crops.

The AP-10K weights cannot be downloaded here: without them the keypoint model refuses to load unless
random weights are asked for explicitly, and then every keypoint it gives is flagged as such (speed and
plumbing only; its scores mean nothing).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.models import HALF, MissingWeights, ModelSpec, resolve_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeypointSpec:
    name: str
    config: str  # inside mmpose's packaged configs
    weights_file: str  # OpenMMLab's file name: its hash part is the start of the file's SHA-256
    source: str  # where the weights are published (fetched by hand where a network allows)

    @property
    def sha256_prefix(self) -> str:
        return self.weights_file.rsplit("-", 1)[-1].split("_")[0]


KEYPOINT_MODELS = {s.name: s for s in (
    # RTMPose-m on AP-10K (AP 0.722): 13.6 M parameters, 256x256 input, SimCC head.
    KeypointSpec("rtmpose-m_ap10k", "animal_2d_keypoint/rtmpose/ap10k/rtmpose-m_8xb64-210e_ap10k-256x256.py",
                 "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.pth",
                 "https://download.openmmlab.com/mmpose/v1/projects/rtmposev1/"),
    # HRNet-w32 on AP-10K (AP 0.722), heatmaps: slower on a CPU, kept for comparison.
    KeypointSpec("hrnet-w32_ap10k", "animal_2d_keypoint/topdown_heatmap/ap10k/td-hm_hrnet-w32_8xb64-210e_ap10k-256x256.py",
                 "hrnet_w32_ap10k_256x256-18aac840_20211029.pth",
                 "https://download.openmmlab.com/mmpose/animal/hrnet/"),
)}


def _configs_dir() -> Path:
    import mmpose

    return Path(mmpose.__file__).parent / ".mim" / "configs"


def weights_of(spec: KeypointSpec, cache: Path) -> tuple[Path, str] | None:
    """The cached weights file and its checksum (None: not in the cache). The checksum must start with
    the hash in OpenMMLab's file name and is pinned beside the file on first use."""
    carrier = ModelSpec(name=spec.name, dim=0, input_size=256, mean=HALF, std=HALF, build=lambda: None,
                        weights_file=spec.weights_file)
    found = resolve_weights(carrier, cache)
    if found is not None and not found[1].startswith(spec.sha256_prefix):
        raise MissingWeights(f"weights of {spec.name} at {found[0]} have checksum {found[1][:12]}, expected "
                             f"{spec.sha256_prefix}...: delete the file and put the published one there")
    return found


class KeypointModel:
    """A loaded AP-10K top-down model: `predict(crops)` gives (17, 3) keypoints per crop."""

    def __init__(self, name: str, cache: Path, *, allow_random: bool = False, device: str = "cpu",
                 flip_test: bool = False):
        import torch

        if name not in KEYPOINT_MODELS:
            raise KeyError(f"unknown keypoint model {name!r}; known: {', '.join(sorted(KEYPOINT_MODELS))}")
        self.spec = KEYPOINT_MODELS[name]
        found = weights_of(self.spec, cache)
        if found is None and not allow_random:
            raise MissingWeights(
                f"no weights for keypoint model {name!r} in {Path(cache) / name / self.spec.weights_file}: put "
                f"{self.spec.source}{self.spec.weights_file} there; or, for speed and plumbing only, allow "
                f"random weights (DEER_ALLOW_RANDOM_WEIGHTS=true: every keypoint is then flagged random-weights)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mmengine.config import Config
            from mmengine.dataset import Compose, pseudo_collate
            from mmpose.apis import init_model

            cfg = Config.fromfile(str(_configs_dir() / self.spec.config))
            # MMPose's configs average each crop with its mirror image: two network passes a crop. Measured on
            # 2 cores (RTMPose-m, batch 8): 74 ms a crop with it, about 40 without.
            cfg.model.test_cfg.flip_test = flip_test
            torch.manual_seed(0)  # random weights, when allowed, are the same in every process
            self.model = init_model(cfg, checkpoint=None if found is None else str(found[0]), device=device)
            self._pipeline = Compose(self.model.cfg.test_dataloader.dataset.pipeline)
        self._collate = pseudo_collate
        self.weights_sha256 = None if found is None else found[1]
        if found is None:
            log.warning("keypoint model %s runs on RANDOM weights: its keypoints mean nothing", name)

    @property
    def random_weights(self) -> bool:
        return self.weights_sha256 is None

    @property
    def version(self) -> str:
        return f"{self.spec.name}:{'random-seed0' if self.random_weights else self.weights_sha256[:12]}"

    def predict(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 crops -> per crop (17, 3) float32: x, y in the crop's pixels, score (clipped to 0..1)."""
        import torch

        if not crops:
            return []
        data = []
        for crop in crops:
            h, w = crop.shape[:2]
            info = {"img": np.ascontiguousarray(crop[:, :, ::-1]),  # MMPose's pipeline takes BGR, as OpenCV reads
                    "bbox": np.array([[0, 0, w, h]], dtype=np.float32), "bbox_score": np.ones(1, dtype=np.float32)}
            info.update(self.model.dataset_meta)
            data.append(self._pipeline(info))
        with torch.inference_mode():
            results = self.model.test_step(self._collate(data))
        out = []
        for r in results:
            xy = np.asarray(r.pred_instances.keypoints[0], dtype=np.float32)
            score = np.clip(np.asarray(r.pred_instances.keypoint_scores[0], dtype=np.float32), 0.0, 1.0)
            out.append(np.concatenate([xy, score[:, None]], axis=1))
        return out
