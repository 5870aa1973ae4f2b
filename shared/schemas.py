"""Versioned event schemas: the only contract between services.

Events are JSON (self-describing, readable with any Kafka tool). Vectors travel as
base64 little-endian float32, never as decimal lists. Every event names the
detection, its stage, and the model and configuration versions it was made with.
"""
from __future__ import annotations

import base64
import enum
from datetime import datetime
from typing import Annotated, Literal, Union
from uuid import UUID

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, TypeAdapter, ValidationError, \
    model_validator

SCHEMA_VERSION = 1


class MalformedEvent(ValueError):
    """The bytes on a topic are not a valid event of the expected kind."""


class DetectionClass(str, enum.Enum):
    buck = "buck"
    mature = "mature"
    mid = "mid"
    young = "young"
    doe = "doe"
    fawn = "fawn"
    unknown = "unknown"


ANTLERED = frozenset({DetectionClass.buck, DetectionClass.mature, DetectionClass.mid, DetectionClass.young})


def sex_of(cls: DetectionClass | str) -> str:
    """The sex a detection class implies: 'male', 'female' or 'unknown' (fawns, unknown)."""
    cls = DetectionClass(cls)
    if cls in ANTLERED:
        return "male"
    if cls is DetectionClass.doe:
        return "female"
    return "unknown"


def _b64_to_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None


B64Bytes = Annotated[
    bytes,
    PlainValidator(_b64_to_bytes),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str, when_used="json"),
]


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes | None):
        if raw is None:
            raise MalformedEvent("empty message (tombstone)")
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "event"
            raise MalformedEvent(f"not a valid {cls.__name__}: {where}: {first.get('msg')}") from None


class Box(BaseModel):
    """Pixel box in the original image: x0,y0 inclusive, x1,y1 exclusive."""

    model_config = ConfigDict(frozen=True)
    x0: int = Field(ge=0)
    y0: int = Field(ge=0)
    x1: int = Field(gt=0)
    y1: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Box":
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError("box must have x1 > x0 and y1 > y0")
        return self

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


class DetectionEvent(_Event):
    """One animal in one image, ready for the feature extractors."""

    kind: Literal["detection"] = "detection"
    detection_id: UUID
    site: str
    camera: str
    captured_at: datetime
    cls: DetectionClass
    box: Box
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    crop_jpeg: B64Bytes  # the crop travels with the event: no service reads another's disk
    attempt: int = Field(0, ge=0)
    mode: Literal["fast", "enhanced"] = "fast"  # the run-time configuration when the event was published
    property: str = "default"  # the population the site belongs to: identity is decided per property
    switches: dict[str, bool] = {}  # the run-time switches at first publication
    expected: list[str] = ["body"]  # the components fusion waits for (shared.pipeline.expected_components)


class Embedding(BaseModel):
    """One model's embedding of one detection, tagged with the version it was made with."""

    model_config = ConfigDict(frozen=True)
    model: str
    version: str  # model name + weights checksum + preprocessing: vectors of different versions never meet
    dim: int = Field(gt=0, le=8192)
    random_weights: bool
    vector: B64Bytes

    @model_validator(mode="after")
    def _length(self) -> "Embedding":
        if len(self.vector) != 4 * self.dim:
            raise ValueError(f"vector holds {len(self.vector)} bytes, expected {4 * self.dim} for dim {self.dim}")
        return self

    @classmethod
    def of(cls, model: str, version: str, array: np.ndarray, random_weights: bool) -> "Embedding":
        arr = np.ascontiguousarray(array, dtype="<f4").ravel()
        return cls(model=model, version=version, dim=arr.size, random_weights=random_weights, vector=arr.tobytes())

    def array(self) -> np.ndarray:
        return np.frombuffer(self.vector, dtype="<f4")


COMPONENTS = ("body", "coat", "pose", "antler")


class Features(_Event):
    """One extractor's output for one detection: what fusion joins by detection id.

    `status` says whether the extractor found evidence: "no-evidence" (antlers not visible, a
    crop too small for coat patterns) is an answer, not an error, and fusion scores without it.
    Vectors travel as `embeddings`; small structured features (counts, flags, keypoints) as
    `attributes`. Every vector names its version, so vectors of different versions never meet.
    """

    kind: Literal["features"] = "features"
    component: Literal["body", "coat", "pose", "antler"]
    detection_id: UUID
    site: str
    property: str = "default"
    camera: str
    captured_at: datetime
    cls: DetectionClass
    status: Literal["ok", "no-evidence"] = "ok"
    embeddings: list[Embedding] = []
    attributes: dict = {}
    flags: list[str] = []
    timings_ms: dict[str, float] = {}
    attempt: int = 0

    @model_validator(mode="after")
    def _body_has_vectors(self) -> "Features":
        if self.component == "body" and self.status == "ok" and not self.embeddings:
            raise ValueError("body features need at least one embedding")
        return self


class JoinDeadline(_Event):
    """The join of a detection is due: decide with the components that arrived (reconciler -> fusion)."""

    kind: Literal["join-deadline"] = "join-deadline"
    detection_id: UUID
    property: str = "default"


class FusionInput:
    """Decodes what fusion consumes: features of any component, or a join deadline (by `kind`)."""

    _adapter = TypeAdapter(Annotated[Union[Features, JoinDeadline], Field(discriminator="kind")])

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> "Features | JoinDeadline":
        if raw is None:
            raise MalformedEvent("empty message (tombstone)")
        try:
            return cls._adapter.validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "event"
            raise MalformedEvent(f"not a valid fusion input: {where}: {first.get('msg')}") from None


class DetectionResult(_Event):
    """The fusion service's decision for one detection."""

    kind: Literal["result"] = "result"
    detection_id: UUID
    site: str
    state: Literal["assigned", "new", "review"]
    individual_id: int | None
    score: float | None
    flags: list[str] = []
    components: dict[str, float] = {}
    versions: dict[str, str] = {}


class PipelineConfig(BaseModel):
    """The run-time switches of the pipeline (changed through the API, no restart).

    Every detection is stamped with them at its first publication, and its result records them.
    `mode` fast runs the one body model (+ temporal): bulk backlogs; enhanced runs every switched-on
    enhancement. coat, pose and antler are off until their services are deployed: a switched-on
    component with no service behind it makes every detection wait the join timeout and come out
    `degraded` with that component named as missing.
    """

    model_config = ConfigDict(extra="forbid")
    mode: Literal["fast", "enhanced"] = "fast"
    ensemble: bool = True  # enhanced mode runs the body ensemble (off: the fast model only)
    temporal: bool = True  # temporal priors in fusion (both modes)
    coat: bool = False  # enhanced mode only
    pose: bool = False  # enhanced mode only, and only when the body-only match is uncertain
    antler: bool = False  # enhanced mode only, antlered classes only

    def switches(self) -> dict[str, bool]:
        return {k: v for k, v in self.model_dump().items() if isinstance(v, bool)}


class DeadLetter(_Event):
    """An event a service could not process, with the reason; its detection is marked failed."""

    kind: Literal["dead_letter"] = "dead_letter"
    service: str
    source_topic: str
    partition: int
    offset: int
    key: str | None
    detection_id: UUID | None
    fails_detection: bool = True  # False: the detection goes on without this event (a refused feature)
    reason: str
    payload: B64Bytes  # the original bytes, truncated to DEAD_LETTER_PAYLOAD_MAX
    payload_truncated: bool = False
    at: datetime


DEAD_LETTER_PAYLOAD_MAX = 64 * 1024
