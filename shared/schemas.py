"""Versioned event schemas: the only contract between services.

Events are JSON (self-describing, readable with any Kafka tool). Vectors travel as
base64 little-endian float32, never as decimal lists. Every event names the
detection, its stage, and the model and configuration versions it was made with.
"""
from __future__ import annotations

import base64
import enum
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, model_validator

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


class BodyFeatures(_Event):
    """Body-appearance embeddings of one detection (one per model in the ensemble)."""

    kind: Literal["features.body"] = "features.body"
    detection_id: UUID
    site: str
    camera: str
    captured_at: datetime
    cls: DetectionClass
    embeddings: list[Embedding] = Field(min_length=1)
    timings_ms: dict[str, float] = {}
    attempt: int = 0


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
    """The run-time switches of the pipeline (changed through the API, no restart)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["fast", "enhanced"] = "fast"  # fast: one body model; enhanced: the body ensemble


class DeadLetter(_Event):
    """An event a service could not process, with the reason; its detection is marked failed."""

    kind: Literal["dead_letter"] = "dead_letter"
    service: str
    source_topic: str
    partition: int
    offset: int
    key: str | None
    detection_id: UUID | None
    reason: str
    payload: B64Bytes  # the original bytes, truncated to DEAD_LETTER_PAYLOAD_MAX
    payload_truncated: bool = False
    at: datetime


DEAD_LETTER_PAYLOAD_MAX = 64 * 1024
