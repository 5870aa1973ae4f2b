"""The coat features' stored formats and how two are compared: the coat service writes them, fusion's coat
components and the evaluation compare them, and the antler service uses the same infrared test.

- Colour: per-region histograms (`BINS` bins per channel, `REGIONS`), day colour and infrared grey levels
  under their own versions, compared by mean histogram intersection after neighbouring-bin smoothing.
- Markings: a map of the animal's bright and dark pieces, compared by cosine.
- Patterns: keypoints and descriptors, packed as uint16 fractions of the crop and int8 descriptors,
  matched by mutual nearest neighbours verified with a MAGSAC homography; the inlier count squashed to
  [0, 1) (n / (n + 12)), monotone, so the calibration maps it to P(same).

Matching cost is the descriptors' similarity matrix (na x nb x d multiply-adds: at a thousand keypoints a side
it is most of a pair's time, the homography a tenth). Stored patterns keep their int8 codes, and two of them
are compared with an integer matrix product (torch's int8 kernel, which uses the CPU's VNNI/AMX instructions
where it has them), each row and column then scaled by its code's inverse length: the same cosines as the
float product up to float rounding, so the same matches. Where that kernel is missing, or a pattern holds
no codes (one just extracted), the float product stands in.
"""
from __future__ import annotations

import functools
import os
import struct
import sys
from dataclasses import dataclass

import cv2
import numpy as np

COLOUR_VERSION = "coat-colour:v1"
GREY_VERSION = "coat-grey:v1"  # infrared frames: grey levels only, never compared with day colour
MARKINGS_VERSION = "coat-markings:v1"

BINS = 16
REGIONS = ("chest", "flanks", "face", "legs")
INFRARED_CHROMA = 6.0  # mean max-min over RGB (0-255) below this: a grey (infrared) frame
SMOOTHING = np.array([0.25, 0.5, 0.25])
INLIER_PX = 8.0  # reprojection threshold, in pixels of a 320-px-wide view of the crop
MIN_MATCHES = 5
SQUASH = 12.0
_HEADER = struct.Struct("<4sHH")  # kind, keypoints, descriptor length


def is_infrared(rgb: np.ndarray) -> bool:
    """Whether the frame is grey (an infrared night frame): no pixel carries colour worth comparing."""
    x = rgb.reshape(-1, 3).astype(np.int16)
    return float((x.max(1) - x.min(1)).mean()) < INFRARED_CHROMA


def colour_similarity(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean histogram intersection (after neighbouring-bin smoothing) over the regions seen in both,
    in [0, 1]; None when no region is seen in both or the two are of different kinds (colour / grey)."""
    if a.shape != b.shape or a.size % (len(REGIONS) * BINS):
        return None
    value = colour_similarity_matrix(np.stack([a, b]))[0, 1]
    return None if np.isnan(value) else float(value)


def colour_similarity_matrix(vectors: np.ndarray) -> np.ndarray:
    """All pairwise `colour_similarity` of equal-length vectors (N, d) -> (N, N), NaN where none."""
    n = len(vectors)
    channels = vectors.shape[1] // (len(REGIONS) * BINS)
    h = _smoothed(vectors.reshape(n, len(REGIONS), channels, BINS))
    seen = h.sum(axis=(2, 3)) > 0  # (n, regions)
    total = np.zeros((n, n))
    for r in range(len(REGIONS)):
        for c in range(channels):
            x = h[:, r, c]  # (n, bins)
            inter = np.minimum(x[:, None, :], x[None, :, :]).sum(-1)
            total += np.where(seen[:, None, r] & seen[None, :, r], inter, 0) / channels
    both = seen.astype(np.float64) @ seen.T.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(both > 0, total / both, np.nan)


def _smoothed(h: np.ndarray) -> np.ndarray:
    """Each histogram spread over its neighbouring bins (edges reflect), still summing to 1."""
    padded = np.concatenate([h[..., :1], h, h[..., -1:]], axis=-1)
    return SMOOTHING[0] * padded[..., :-2] + SMOOTHING[1] * padded[..., 1:-1] + SMOOTHING[2] * padded[..., 2:]


def marking_similarity(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cosine of two marking maps; None when either animal shows no markings (nothing to compare)."""
    if a.shape != b.shape:
        return None
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else None


class PatternError(ValueError):
    """A stored pattern that cannot be read."""


@dataclass(frozen=True)
class Pattern:
    kind: str  # "xfe1" (XFeat) or "rsf1" (RootSIFT)
    points: np.ndarray  # (n, 2) float32, fractions of the crop's width and height
    descriptors: np.ndarray  # (n, d) float32, unit length
    codes: np.ndarray | None = None  # (n, d) int8 as stored, when unpacked: the integer product's input
    scales: np.ndarray | None = None  # (n,) float32: each code's inverse length (codes x scales = descriptors)

    def __len__(self) -> int:
        return len(self.points)


def pack(p: Pattern) -> bytes:
    points = np.clip(np.round(p.points * 65535), 0, 65535).astype("<u2")
    desc = np.clip(np.round(p.descriptors * 127), -127, 127).astype(np.int8)
    return _HEADER.pack(p.kind.encode(), len(p), desc.shape[1] if len(p) else 0) + points.tobytes() + desc.tobytes()


def unpack(raw: bytes) -> Pattern:
    if len(raw) < _HEADER.size:
        raise PatternError("pattern shorter than its header")
    kind, n, dim = _HEADER.unpack_from(raw)
    if len(raw) != _HEADER.size + n * (4 + dim) or kind not in (b"xfe1", b"rsf1"):
        raise PatternError(f"pattern of {len(raw)} bytes does not hold {n} keypoints of {dim} values ({kind!r})")
    body = memoryview(raw)[_HEADER.size:]
    points = np.frombuffer(body[:4 * n], "<u2").reshape(n, 2).astype(np.float32) / 65535
    codes = np.frombuffer(body[4 * n:], np.int8).reshape(n, dim).copy()  # writable: torch shares its memory
    desc = codes.astype(np.float32)
    scales = 1.0 / np.maximum(np.linalg.norm(desc, axis=1), 1e-6)
    return Pattern(kind.decode(), points, desc * scales[:, None], codes, scales.astype(np.float32))


_forked = False  # this process was forked from another (eval's worker pools are)


def _mark_forked() -> None:
    global _forked
    _forked = True
    _single_threaded.cache_clear()


os.register_at_fork(after_in_child=_mark_forked)


@functools.cache
def _single_threaded(torch) -> None:
    """In a forked process, torch's products run on the calling thread: the thread pool a parent started
    (eval embeds photos before it forks its matching workers) hangs the child's first parallel product
    (measured: torch._int_mm never returned). A forked worker is one of one-per-core anyway."""
    torch.set_num_threads(1)


@functools.cache
def _int8_kernel():
    """torch, when its int8 matrix product runs here (checked once against the exact product), else None.
    A process that imports torch only for this (fusion) runs it on one thread: the products are small and
    run beside other services on the same cores, where torch's thread pool spins; measured under load, the
    two-thread product took 11 ms a pair where numpy's float product took 7."""
    try:
        only_ours = "torch" not in sys.modules
        import torch

        if only_ours:
            torch.set_num_threads(1)

        a = torch.tensor([[3, -7], [127, -127]], dtype=torch.int8)
        if torch.equal(torch._int_mm(a, a.T), a.int() @ a.int().T):
            return torch
    except Exception:  # noqa: BLE001 - no torch, or a build without the CPU kernel: the float product stands in
        pass
    return None


def mutual_matches(a: Pattern, b: Pattern) -> tuple[np.ndarray, np.ndarray]:
    """(i, j): the descriptor pairs each the other's nearest by cosine (mutual nearest neighbours)."""
    torch = _int8_kernel() if a.codes is not None and b.codes is not None else None
    if torch is not None:
        if _forked:
            _single_threaded(torch)
        sims = torch._int_mm(torch.from_numpy(a.codes), torch.from_numpy(b.codes).T).float()
        sims *= torch.from_numpy(a.scales)[:, None]
        sims *= torch.from_numpy(b.scales)[None, :]
        forward, backward = sims.argmax(1).numpy(), sims.argmax(0).numpy()
    else:
        sims = a.descriptors @ b.descriptors.T
        forward, backward = sims.argmax(1), sims.argmax(0)
    i = np.nonzero(backward[forward] == np.arange(len(forward)))[0]
    return i, forward[i]


def inliers(a: Pattern, b: Pattern) -> int:
    """Geometrically verified matches between two patterns of one kind (0 when too few to verify)."""
    if a.kind != b.kind or len(a) < MIN_MATCHES or len(b) < MIN_MATCHES:
        return 0
    i, j = mutual_matches(a, b)
    if len(i) < MIN_MATCHES:
        return 0
    view = np.array([320.0, 224.0], np.float32)  # one scale for both crops: thresholds in comparable pixels
    _, verified = cv2.findHomography(a.points[i] * view, b.points[j] * view, cv2.USAC_MAGSAC, INLIER_PX,
                                     maxIters=500, confidence=0.99)
    return int(verified.sum()) if verified is not None else 0


def pattern_score(count: int) -> float:
    """Inlier count -> [0, 1): monotone, so calibration keeps its order."""
    return count / (count + SQUASH)
