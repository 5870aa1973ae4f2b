"""The coat features' stored formats and how two are compared: the coat service writes them, fusion's coat
components and the evaluation compare them, and the antler service uses the same infrared test.

- Colour: per-region histograms (`BINS` bins per channel, `REGIONS`), day colour and infrared grey levels
  under their own versions, compared by mean histogram intersection after neighbouring-bin smoothing.
- Markings: a map of the animal's bright and dark pieces, compared by cosine.
- Patterns: keypoints and descriptors, packed as uint16 fractions of the crop and int8 descriptors,
  matched by mutual nearest neighbours verified with a MAGSAC homography; the inlier count squashed to
  [0, 1) (n / (n + 12)), monotone, so the calibration maps it to P(same). A pattern is held as the int8
  codes it is stored as, so a fresh pattern and the same one read back match alike, and the codes'
  products are taken exactly in integers (`PatternProducts`).
"""
from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Iterable

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
# the most keypoints a pattern may hold (the extractors' budgets are bounded by it): matching two patterns
# holds an (n, m) matrix, so fusion refuses a longer one instead of allocating gigabytes for a hostile event
MAX_PATTERN_KEYPOINTS = 8192
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
    codes: np.ndarray  # (n, d) int8: the unit-length descriptors x 127, rounded, as stored

    @classmethod
    def quantised(cls, kind: str, points: np.ndarray, descriptors: np.ndarray) -> Pattern:
        """A pattern from an extractor's unit-length float descriptors."""
        return cls(kind, points, np.clip(np.round(descriptors * 127), -127, 127).astype(np.int8))

    def __len__(self) -> int:
        return len(self.points)

    @cached_property
    def descriptors(self) -> np.ndarray:
        """The codes as unit-length float32 vectors."""
        return self.codes / self.norms[:, None]

    @cached_property
    def norms(self) -> np.ndarray:
        return np.maximum(np.linalg.norm(self.codes.astype(np.float32), axis=1), 1e-6)

    @cached_property
    def scales(self) -> np.ndarray:
        """1 / the codes' norms, float32."""
        return (1 / self.norms).astype(np.float32)

    @cached_property
    def unsigned(self) -> np.ndarray:
        """The codes + 128 as uint8 (flipping the sign bit), the left operand of an integer product."""
        return self.codes.view(np.uint8) ^ np.uint8(0x80)

    @cached_property
    def columns(self) -> np.ndarray:
        """The codes transposed, (d, n) contiguous, the right operand of an integer product."""
        return np.ascontiguousarray(self.codes.T)


def pack(p: Pattern) -> bytes:
    points = np.clip(np.round(p.points * 65535), 0, 65535).astype("<u2")
    return _HEADER.pack(p.kind.encode(), len(p), p.codes.shape[1] if len(p) else 0) + points.tobytes() + p.codes.tobytes()


def as_pattern(stored: bytes | Pattern) -> Pattern:
    """A pattern as stored (packed bytes) or already unpacked (fusion's `PatternCache`)."""
    return stored if isinstance(stored, Pattern) else unpack(stored)


class PatternCache:
    """Unpacked patterns kept between detections, least recently used first out, within `budget_bytes`.

    Why: fusion matches each detection against its shortlist's stored patterns, and the same gallery photos
    (the individuals' exemplars) come back detection after detection. Read again, each was fetched from
    PostgreSQL (a 1,700-keypoint RootSIFT pattern is 220 kB), unpacked, and its norms, unsigned codes and
    columns made again before the first product. A stored pattern never changes (one row per detection and
    matcher, written once), so the key is (detection, matcher) and the version is kept to check it.
    Counted per entry: its codes, and the unsigned codes and columns that matching makes of them (each the
    codes' size), and its points."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self._entries: OrderedDict = OrderedDict()  # key -> (version, pattern, bytes counted), oldest use first

    @staticmethod
    def size_of(p: Pattern) -> int:
        return 3 * p.codes.nbytes + p.points.nbytes + 64

    def put(self, key, version: str, pattern: Pattern) -> Pattern:
        size = self.size_of(pattern)
        if size > self.budget:
            return pattern
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= old[2]
        while self._entries and self.used + size > self.budget:
            _, (_, _, freed) = self._entries.popitem(last=False)
            self.used -= freed
        self._entries[key] = (version, pattern, size)
        self.used += size
        return pattern

    def holding(self, keys) -> dict:
        """{key: (version, pattern)} of those of `keys` it holds, each now the most recently used: references the
        caller keeps while it reads the rest, whatever is evicted meanwhile."""
        held = {}
        for k in keys:
            if k in self._entries:
                self._entries.move_to_end(k)
                held[k] = self._entries[k][:2]
        return held

    def __len__(self) -> int:
        return len(self._entries)


def unpack(raw: bytes) -> Pattern:
    if len(raw) < _HEADER.size:
        raise PatternError("pattern shorter than its header")
    kind, n, dim = _HEADER.unpack_from(raw)
    if len(raw) != _HEADER.size + n * (4 + dim) or kind not in (b"xfe1", b"rsf1"):
        raise PatternError(f"pattern of {len(raw)} bytes does not hold {n} keypoints of {dim} values ({kind!r})")
    body = memoryview(raw)[_HEADER.size:]
    points = np.frombuffer(body[:4 * n], "<u2").reshape(n, 2).astype(np.float32) / 65535
    return Pattern(kind.decode(), points, np.frombuffer(body[4 * n:], np.int8).reshape(n, dim))


class PatternProducts:
    """Cosine similarities of two patterns from their int8 codes, (n, m) float32: ONNX Runtime's
    `MatMulIntegerToFloat` (uint8 x int8, the left operand's zero point at 128, so the codes enter as they are
    stored with the sign bit flipped) accumulates the codes' dot products exactly in int32 and scales each
    column by the right pattern's inverse norms in the kernel; the rows are scaled after.

    Why not float: the product of two 1,070-keypoint RootSIFT patterns was most of a pair's matching cost,
    numpy's float32 product 2.5 ms of the 3.0 ms a pair on one Zen 4 core; the integer kernel (VNNI) takes
    0.38 ms, and scaling inside it saves two passes over the matrix (similarities of two ~1,500-keypoint
    patterns 2.2 -> 1.4 ms against an int32 product scaled in numpy). Why exact: int8 x int8 sums over 128
    dimensions stay far below 2**24, so each similarity is the codes' true dot product rounded once or twice
    to float32. One thread: concurrency comes from the services' processes."""

    def __init__(self) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("MatMulIntegerToFloat", ["a", "b", "a_scale", "b_scale", "a_zero"], ["similarities"],
                              domain="com.microsoft")], "pattern_products",
            [helper.make_tensor_value_info("a", TensorProto.UINT8, ["n", "d"]),
             helper.make_tensor_value_info("b", TensorProto.INT8, ["d", "m"]),
             helper.make_tensor_value_info("a_scale", TensorProto.FLOAT, []),
             helper.make_tensor_value_info("b_scale", TensorProto.FLOAT, ["m"])],
            [helper.make_tensor_value_info("similarities", TensorProto.FLOAT, ["n", "m"])],
            initializer=[helper.make_tensor("a_zero", TensorProto.UINT8, [], [128])])
        model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13),
                                                                     helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def __call__(self, a: Pattern, b: Pattern, rows: slice = slice(None)) -> np.ndarray:
        """The similarities of `a`'s `rows` to every descriptor of `b`."""
        sims = self._session.run(None, {"a": a.unsigned[rows], "b": b.columns, "a_scale": _ONE,
                                        "b_scale": b.scales})[0]
        sims *= a.scales[rows, None]
        return sims


_ONE = np.array(1.0, np.float32)


@cache
def _pattern_products() -> PatternProducts:
    """The process's one session, built at first use."""
    return PatternProducts()


def similarities(a: Pattern, b: Pattern) -> np.ndarray:
    """Cosine similarities of the two patterns' descriptors, (n, m) float32."""
    return _pattern_products()(a, b)


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


def mutual_nearest(sims: np.ndarray | Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the pairs that are each other's most similar in a (n, m) similarity matrix, rows
    ascending; the matrix whole, or as its consecutive blocks of rows (`mutual_matches`), each reduced
    before the next is read. A row's best column is `argmax`; the column's side needs only its maximum, not
    its argmax: numpy's argmax across rows walks the matrix column by column, 1.9 of the 3.5 ms a pair at
    1,100 keypoints on one Zen 4 core, where `max(0)` takes 0.5. Where a column's maximum is shared (an
    exact tie, rare in float products), the first row that reaches it from its own best column keeps the
    match."""
    forward, best, column_max = [], [], None
    for block in [sims] if isinstance(sims, np.ndarray) else sims:
        f = block.argmax(1)
        forward.append(f)
        best.append(block[np.arange(len(f)), f])
        column_max = block.max(0) if column_max is None else np.maximum(column_max, block.max(0), out=column_max)
    if column_max is None:  # no rows
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    forward = np.concatenate(forward)
    rows = np.nonzero(np.concatenate(best) >= column_max[forward])[0]
    _, first = np.unique(forward[rows], return_index=True)  # one row per column
    rows = np.sort(rows[first])
    return rows, forward[rows]


# Similarities made and reduced at a time by `mutual_matches`: 2**17 float32 (512 KiB) stay in a core's L2
# cache (2 MiB on the Xeon measured, 1 MiB on Zen 4) between the product that writes them and the row argmax
# and column maximum that read them. Measured on one core of a 2-core Intel Xeon, real RootSIFT patterns cut
# to n keypoints, ms a pair (whole matrix / blocks of 2**16, 2**17, 2**18): n = 1,100: 2.19 / 1.58, 1.43,
# 1.89; 1,700: 5.05 / 3.99, 3.38, 4.42; 2,500: 12.2 / 9.7, 8.1, 10.7.
BLOCK_FLOATS = 1 << 17


def mutual_matches(a: Pattern, b: Pattern, block_floats: int = BLOCK_FLOATS) -> tuple[np.ndarray, np.ndarray]:
    """`mutual_nearest(similarities(a, b))`, the same pairs bit for bit, without the whole matrix: the
    similarities are made a block of `a`'s rows at a time, each reduced while in cache before the next is
    made (each element is the same integer product scaled the same way whatever the block). The whole
    matrix of two 1,700-keypoint patterns is 11.5 MB, and writing it, scaling it and reading it twice went
    to memory."""
    products = _pattern_products()
    step = max(1, block_floats // max(1, len(b)))
    return mutual_nearest(products(a, b, slice(start, start + step)) for start in range(0, len(a), step))


def pattern_score(count: int) -> float:
    """Inlier count -> [0, 1): monotone, so calibration keeps its order."""
    return count / (count + SQUASH)
