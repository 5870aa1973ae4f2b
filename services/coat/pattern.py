"""Coat pattern: local keypoints and descriptors on the animal, matched with geometric verification.

Extraction (`PatternExtractor`): XFeat (ONNX, vendored in `xfeat/`, Apache-2.0) on the crop resized to
the network's input (320x224 for landscape crops, 256x256 otherwise), keypoints from its keypoint
heat map (5 px non-maximum suppression), ranked by heat x reliability, restricted to the animal's
mask when one is given, the best `keypoints` kept; descriptors sampled bilinearly from the dense map.
RootSIFT (OpenCV SIFT, Hellinger-normalised) is the second matcher: the service extracts both by default
(`DEER_COAT_PATTERNS`), and fusion calibrates and weighs each as a component of its own. RootSIFT's detail is
its keypoint count, not the photo's resolution: at OpenCV's default contrast threshold (0.04) SIFT finds about
300 keypoints on a 512-px animal whatever the budget, so the service lowers it (`DEER_COAT_SIFT_CONTRAST`) and
keeps up to `DEER_COAT_SIFT_KEYPOINTS` (the budget curve in shared/config.py says why these values).
SIFT builds its scale space over the whole image it is given (doubled first), though only keypoints inside
the mask are kept, so it is given the mask's bounding box: widened by `SIFT_MARGIN` px, its corners on a
`SIFT_GRID` px grid so that each coarser octave samples the same pixels as on the whole crop. Measured on 40
nyala-train crops: 0.89x the time (105-108 -> 90-96 ms on one Zen 4 core), 99.8% of the keypoints found at
the same place and angle, 99.5% of those with the same descriptor (cosine > 0.999); without the grid
alignment only 95% of the keypoints were the same. A budget that binds keeps more of the animal's keypoints
than on the whole crop (OpenCV keeps its best keypoints before it applies the mask, so less scene competes);
the service's does not bind.

Storage (`shared.coat.pack`/`unpack`, beside the matching, which fusion shares): positions as uint16 fractions of the crop, descriptors as int8 (x127 of
unit vectors): 4 + 64 bytes per XFeat keypoint, 4 + 128 per RootSIFT keypoint. The service keeps up to
1,024 XFeat keypoints (`DEER_COAT_KEYPOINTS`) and 8,000 RootSIFT ones (`DEER_COAT_SIFT_KEYPOINTS`).

Matching (`shared.coat.inliers`): mutual nearest neighbours, then a homography fitted with MAGSAC; the score is the
inlier count squashed to [0, 1) (n / (n + 12)), monotone, so the calibration maps it to P(same).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import cv2
import numpy as np

from shared.coat import Pattern

XFEAT_DIR = Path(__file__).parent / "xfeat"
# (height, width) -> file, sha256: the weights are pinned like every model
XFEAT_MODELS = {
    (224, 320): ("xfeat_320x224.onnx", "4eb3d29927367b64c1d203a42b03c7332e6b1ff3438d140c02e8f537678b481f"),
    (256, 256): ("xfeat_256x256.onnx", "9b4292da0e6bdc8c3e87ae2b528ebad3dfbc9afdef696b95b22b4d21503bb5fe"),
}
LANDSCAPE = 1.15  # width/height above which the 320x224 network is used
SIFT_DEFAULT_CONTRAST = 0.04  # OpenCV's: patterns extracted at it keep the version they had before it was a setting
HEAT_MIN = 0.05
NMS = 5
SIFT_MARGIN = 16  # px around the animal's box: SIFT drops keypoints within 5 px of the image's edge
SIFT_GRID = 32  # px: the box's corners snap outward to it (the module docstring says why)


def _check(path: Path, sha: str) -> None:
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != sha:
        raise RuntimeError(f"{path}: checksum {got[:12]}... does not match the pinned {sha[:12]}...")


@functools.cache
def _session(size: tuple[int, int]):
    import onnxruntime as ort

    name, sha = XFEAT_MODELS[size]
    path = XFEAT_DIR / name
    _check(path, sha)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one crop per thread; the service runs crops side by side
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def xfeat_version() -> str:
    return "xfeat-" + XFEAT_MODELS[(224, 320)][1][:12]


class PatternExtractor:
    """Keypoints and descriptors of one crop; `method` is "xfeat" (default) or "rootsift"."""

    def __init__(self, method: str = "xfeat", keypoints: int = 1024, contrast: float = SIFT_DEFAULT_CONTRAST):
        if method not in ("xfeat", "rootsift"):
            raise ValueError(f"unknown pattern method {method!r}")
        self.method, self.keypoints, self.contrast = method, keypoints, contrast

    @property
    def version(self) -> str:
        """What a pattern was extracted with (the matcher's weights, SIFT's contrast threshold, the budget):
        patterns of two versions are never compared."""
        if self.method == "xfeat":
            return f"{xfeat_version()}:{self.keypoints}"
        contrast = "" if self.contrast == SIFT_DEFAULT_CONTRAST else f"-c{self.contrast:g}"
        return f"rootsift-opencv{contrast}:{self.keypoints}"

    def load(self) -> None:
        """Open (and checksum) the networks now rather than on the first crop."""
        if self.method == "xfeat":
            for size in XFEAT_MODELS:
                _session(size)

    def __call__(self, rgb: np.ndarray, mask: np.ndarray | None = None) -> Pattern:
        return self._xfeat(rgb, mask) if self.method == "xfeat" else self._rootsift(rgb, mask)

    def _xfeat(self, rgb: np.ndarray, mask: np.ndarray | None) -> Pattern:
        h0, w0 = rgb.shape[:2]
        size = (224, 320) if w0 >= LANDSCAPE * h0 else (256, 256)
        image = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        dense, logits, reliability = _session(size).run(None, {"input": image.transpose(2, 0, 1)[None]})
        dense = dense[0] / np.maximum(np.linalg.norm(dense[0], axis=0, keepdims=True), 1e-8)
        heat = _heat_map(logits[0])
        peaks = (heat == _max_filter(heat, NMS)) & (heat > HEAT_MIN)
        if mask is not None:
            peaks &= cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0
        ys, xs = np.nonzero(peaks)
        cells = np.stack([xs / 8.0, ys / 8.0], 1)
        score = heat[ys, xs] * _bilinear(reliability[0], cells)[:, 0]
        best = np.argsort(-score, kind="stable")[:self.keypoints]
        desc = _bilinear(dense, cells[best])
        desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-8)
        points = np.stack([xs[best] / size[1], ys[best] / size[0]], 1).astype(np.float32)
        return Pattern.quantised("xfe1", points, desc)

    def _rootsift(self, rgb: np.ndarray, mask: np.ndarray | None) -> Pattern:
        h, w = rgb.shape[:2]
        sift = cv2.SIFT_create(nfeatures=self.keypoints, contrastThreshold=self.contrast)
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        x0, y0, x1, y1 = 0, 0, w, h
        if mask is not None:
            mask = (mask > 0).astype(np.uint8) * 255
            x0, y0, x1, y1 = sift_window(mask, w, h)
            grey, mask = grey[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        found, desc = sift.detectAndCompute(grey, mask)
        if desc is None or not found:
            return Pattern.quantised("rsf1", np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
        desc = np.sqrt(desc / np.maximum(desc.sum(1, keepdims=True), 1e-7))
        desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-8)
        points = np.array([((k.pt[0] + x0) / w, (k.pt[1] + y0) / h) for k in found], np.float32)
        return Pattern.quantised("rsf1", points[:self.keypoints], desc[:self.keypoints])


def sift_window(mask: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the part of a crop SIFT needs to find the keypoints inside `mask` (the module's
    docstring); the whole crop when the mask is empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return 0, 0, w, h
    def down(v: int) -> int:
        return max(0, v - SIFT_MARGIN) // SIFT_GRID * SIFT_GRID

    def up(v: int, limit: int) -> int:
        return min(limit, -(-(v + 1 + SIFT_MARGIN) // SIFT_GRID) * SIFT_GRID)

    return down(int(xs.min())), down(int(ys.min())), up(int(xs.max()), w), up(int(ys.max()), h)


def _heat_map(logits: np.ndarray) -> np.ndarray:
    """XFeat's 65-channel cell logits -> a full-resolution keypoint heat map (softmax, dustbin dropped)."""
    e = np.exp(logits - logits.max(0, keepdims=True))
    cells = (e / e.sum(0, keepdims=True))[:64]
    h, w = cells.shape[1:]
    return cells.transpose(1, 2, 0).reshape(h, w, 8, 8).transpose(0, 2, 1, 3).reshape(h * 8, w * 8)


def _max_filter(x: np.ndarray, k: int) -> np.ndarray:
    return cv2.dilate(x, np.ones((k, k), np.uint8))


def _bilinear(grid: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample a (C, h, w) map at (n, 2) positions in its own cell units -> (n, C)."""
    _, h, w = grid.shape
    x, y = np.clip(xy[:, 0], 0, w - 1), np.clip(xy[:, 1], 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ax, ay = x - x0, y - y0
    return (grid[:, y0, x0] * (1 - ax) * (1 - ay) + grid[:, y0, x1] * ax * (1 - ay)
            + grid[:, y1, x0] * (1 - ax) * ay + grid[:, y1, x1] * ax * ay).T


