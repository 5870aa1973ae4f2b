"""Validated configuration, read from `DEER_*` environment variables.

Every process (service, API, CLI) reads the same settings, so pointing the whole
system at an external Kafka and PostgreSQL is a matter of two variables:
`DEER_KAFKA_BOOTSTRAP` and `DEER_DATABASE_URL`.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "deer-reid"


def _default_model_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "deer-reid" / "models"


class Settings(BaseSettings):
    """Settings shared by every deer-reid process."""

    model_config = SettingsConfigDict(env_prefix="DEER_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="state directory of the embedded stack")
    kafka_bootstrap: str = "127.0.0.1:19092"
    database_url: str = ""  # empty: the embedded PostgreSQL under `home`
    blob_dir: Path | None = None  # original images, content-addressed; default home/blobs
    model_cache: Path = Field(default_factory=_default_model_cache)

    body_model: str = "efficientnet_lite0"  # fast mode
    body_ensemble: str = ""  # enhanced mode, comma-separated (empty: enhanced runs the fast model)
    ensemble_weights: str = "resnet50=0.4,efficientnet_b3=0.3,vit_base_patch16_224=0.3"  # others weigh 1
    allow_random_weights: bool = False
    fetch_weights: bool = False  # fetch missing weights once from the Hugging Face hub into model_cache
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where native: CUDA, AMX, AVX-512 BF16) | bf16 | fp32
    torch_threads: int = 0  # 0: one per available core
    # what runs the networks: auto (OpenVINO where it measured faster: bf16 on a CPU with AMX), torch, openvino
    inference_engine: Literal["auto", "torch", "openvino"] = "auto"
    # the body service answers an event it saw lately from its embeddings (0: always embed again)
    body_cache_entries: int = Field(8192, ge=0)

    # micro-batching of the broker runner
    batch_max: int = Field(16, ge=1, le=1024)
    batch_wait_ms: int = Field(25, ge=0, le=5000)
    max_retries: int = Field(3, ge=0, le=20)
    retry_backoff_ms: int = Field(200, ge=0)

    # fusion decision; defaults until a calibration artifact replaces them
    calibration: Path | None = None  # file `deer-reid eval` writes (fusion reads the one installed in the database)
    match_threshold: float = Field(0.80, ge=-1, le=1)
    new_threshold: float = Field(0.65, ge=-1, le=1)
    candidates_k: int = Field(50, ge=1, le=1000)
    exemplars_per_individual: int = Field(8, ge=1, le=64)
    # the join: how long fusion waits, once the body features are in, for the other expected components
    join_timeout_s: float = Field(10.0, gt=0, le=3600)
    # an individual's score from its exemplars without a fitted artifact: best | mean2 (eval measures both)
    identity_aggregation: str = Field("best", pattern="^(best|mean2)$")
    rut_months: list[int] = [11, 12]  # temporal boost x0.3 in these months (DEER_RUT_MONTHS='[10,11,12]')
    join_sweep_every_s: float = Field(1.0, gt=0)  # the reconciler's look for joins past their deadline

    # coat service and its matching in fusion
    # local feature matchers, each its own fusion component (comma-separated): on nyala-train's fit half, fused
    # with body, colour and markings, XFeat + RootSIFT beat XFeat alone (eval --coat measures each)
    coat_patterns: str = Field("xfeat,rootsift", pattern="^(xfeat|rootsift)(,(xfeat|rootsift))?$")
    # per detection: measured on nyala-train's fit-half identities (pattern alone, top-1 / top-5):
    # 256: 0.079 / 0.284, 512: 0.099 / 0.297, 1024: 0.116 / 0.334, every keypoint (~700): 0.117 / 0.330
    coat_keypoints: int = Field(1024, ge=16, le=4096)  # <= shared.coat.MAX_PATTERN_KEYPOINTS
    # RootSIFT's own budget and SIFT's contrast threshold: at OpenCV's 0.04 SIFT finds ~300 keypoints on the
    # animal whatever the budget; lowered, it finds more, and more keypoints is what lifts RootSIFT. The curve
    # on nyala-train's fit-half identities (`deer-reid eval --protocol keypoints`: pattern alone re-ranking each
    # photo's 60 closest by Lite0, 545 photos; the README has the table), keypoints : contrast -> found,
    # top-1 / top-5, ms a pair with integer products: 3,000 : 0.01 -> 1,108, 0.165 / 0.345, 1.48;
    # 4,000 : 0.005 -> 1,455, 0.211 / 0.363, 2.60; 6,000 : 0.003 -> 1,696, 0.224 / 0.384, 4.09;
    # 8,000 : 0.002 -> 1,706, 0.259 / 0.407, 3.73 (the body's own order: top-1 0.083). Below 0.003 SIFT finds
    # hardly more (the budget no longer binds); 8,000 at 0.002 costs about what 3,000 at 0.01 cost a pair
    # with float products (3.30 ms), so the integer products' saving is spent on detail.
    coat_sift_keypoints: int = Field(8000, ge=16, le=8192)  # <= shared.coat.MAX_PATTERN_KEYPOINTS
    coat_sift_contrast: float = Field(0.002, gt=0, le=0.2)
    coat_restrict_to_animal: bool = True  # keypoints on the foreground only (the box is loose)
    coat_workers: int = 0  # crops processed side by side (0: one per core)
    # gallery photos closest by the fast body model that a detection's coat is compared with. Measured with
    # `eval --coat` on nyala-train's fit half (both matchers fused, top-1 / top-5): 20: 0.127 / 0.312,
    # 40: 0.145 / 0.334, 60: 0.143 / 0.358, 100: 0.163 / 0.363; the cost grows with it (bench --mode enhanced)
    coat_shortlist: int = Field(60, ge=1, le=1000)
    # the first of those (closest by body) the keypoint matchers compare, the rest taking the floor: matching
    # is the costliest comparison (a few ms a pair at RootSIFT's budget). Not cut by default: on nyala-train's
    # fit half RootSIFT alone re-ranking each photo's 20 closest gave top-1 0.138 against 0.180 for its 60
    # (545 photos; `eval --protocol keypoints --coat-shortlist 20`), a third of the matching for 0.04 of top-1
    coat_pattern_shortlist: int = Field(60, ge=1, le=1000)
    # the cascade: the costlier keypoint matcher (RootSIFT, 2.4 ms a pair) verifies only the K photos of those
    # that the cheaper one (XFeat, 0.8 ms) matched best; 0: every one. The rule: the smallest K for which the
    # first candidate by both matchers' squashed counts stays the same for 99% of queries on nyala-train's fit
    # half (545 queries, 60 photos each). At RootSIFT's ~1,700 keypoints: 0.883 / 0.969 / 0.989 / 1.000 at
    # K = 10 / 20 / 30 / 40 (at ~1,100 keypoints it was 0.862 / 0.972 / 0.993 at 10 / 20 / 30, and 30 was the
    # setting): 40, for two thirds of RootSIFT's matching (`eval --coat` reports the agreement held out)
    coat_cascade_shortlist: int = Field(40, ge=0, le=1000)
    # unpacked gallery patterns fusion keeps between detections (`shared.coat.PatternCache`), in MiB (0: none):
    # at 256 about 380 RootSIFT patterns of 1,700 keypoints, or 1,300 XFeat ones of 1,024 (a pattern costs
    # about three times its stored size once matched)
    fusion_pattern_cache_mb: int = Field(256, ge=0, le=65536)

    # antler service and its matching in fusion
    antler_model: str = "efficientnet_lite0"  # the network whose region embedding the fingerprint projects
    antler_workers: int = 0  # crops measured side by side (0: one per core)
    antler_season_start: str = Field("09-01", pattern=r"^\d{2}-\d{2}$")  # MM-DD: hard antlers, the rut
    antler_season_end: str = Field("01-31", pattern=r"^\d{2}-\d{2}$")
    antler_casting_months: list[int] = [2, 3]  # SPEC: Feb-Mar
    antler_shortlist: int = Field(10, ge=1, le=200)  # candidates (best by body) compared on antlers
    # A candidate matching on body/coat whose best same-season antler similarity is below this is a possible
    # duplicate profile (sent to review, never merged). 0.40: the 5th percentile of same-animal pairs on
    # nyala-train's males (`eval --antler`: 0.377-0.411), so about 1 true match in 20 is sent to a person.
    # Horns are not antlers; re-measure on deer.
    antler_conflict_below: float = Field(0.40, ge=-1, le=1)

    # pose service
    pose_keypoint_model: str = "rtmpose-m_ap10k"  # AP-10K top-down model ("" or "none": viewpoint classifier only)
    pose_viewpoint_model: str = "viewpoint"  # `deer-reid train viewpoint --name ...` ("" or "none": off)
    pose_flip_test: bool = False  # average each crop's keypoints with its mirror image's (twice the network time)

    # reconciler
    stuck_after_s: float = Field(120.0, gt=0)
    # the longest a detection waiting in a flowing queue is left be before it counts as stuck anyway, and the
    # longest a join waits (from its body's arrival) past its deadline on components still on their way
    queued_max_s: float = Field(1800.0, gt=0)
    reconcile_every_s: float = Field(5.0, gt=0)
    max_attempts: int = Field(10, ge=1)
    relay_batch: int = Field(256, ge=1)

    # census (the identity graph's re-clustering, services/census)
    census_poll_s: float = Field(2.0, gt=0)  # how often the census service looks for requested or due runs
    census_after_decisions: int = Field(50, ge=1)  # a property is re-clustered after this many new decisions
    census_every_s: float = Field(900.0, gt=0)  # ... or this long after its last run, if anything changed
    census_neighbours: int = Field(10, ge=0, le=100)  # body nearest neighbours per detection added as edges
    # the k of the body scores' local scaling (shared.census.hubness; 0: raw scores, nearest by raw similarity)
    census_hubness_k: int = Field(10, ge=0, le=100)
    census_questions_kept: int = Field(500, ge=1, le=100_000)  # questions a run leaves open, best first
    # a question counts as "left" while its answer has at least this chance of changing the census
    census_stop_flip: float = Field(0.1, gt=0, lt=1)
    # the share of people's answers assumed wrong: how likely an uncorroborated `same` was a slip, which decides
    # how soon the census asks to verify it (shared.census.plan.verifications)
    census_reviewer_error: float = Field(0.02, gt=0, lt=0.5)
    census_refit_min_answers: int = Field(30, ge=2)  # answered pairs before a property's calibration is refitted
    census_refit_min_each: int = Field(8, ge=1)  # ... with at least this many `same` and `different`
    census_refit_every: int = Field(10, ge=1)  # new answers between refits
    # what a refit fits (shared.census.refit): `scale`, a scale and a shift of the fused log-odds in force;
    # `full`, every component's calibration and the fusion weights again
    census_refit_form: Literal["scale", "full"] = "scale"
    # a season's run moves tens of thousands of rows in a statement: longer than the services' 60 s
    census_statement_timeout_s: float = Field(900.0, gt=0)

    # uploads
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1)
    max_pixels: int = Field(80_000_000, ge=1)
    max_files_per_upload: int = Field(64, ge=1)
    # a whole request, refused with 413 before any parsing (64 files of 50 MB would be 3.2 GB held at once);
    # the command line sends one image per request
    max_request_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    # per client address: a burst, then a sustained rate (429 past it); `deer-reid ingest` sends ~4 at once
    rate_limit_per_s: float = Field(100.0, gt=0)
    rate_limit_burst: int = Field(400, ge=1)
    # proxies in front of the API (an ingress): the rate limit keys on the client they forward for
    # (X-Forwarded-For), not on their own address; comma-separated addresses or networks
    trusted_proxies: str = ""
    # a request body that takes longer than this to arrive is answered 408 (a slow sender holds a worker)
    request_body_timeout_s: float = Field(120.0, gt=0)
    # other origins (e.g. "https://dash.example.org") allowed to call the API from a browser; comma-separated
    cors_origins: str = ""
    # single-animal frames of one camera this close in time are one sighting, decided together (0: off)
    sighting_gap_s: float = Field(10.0, ge=0, le=600)
    crop_max_side: int = Field(512, ge=64, le=4096)

    # ports of the embedded stack
    api_host: str = "127.0.0.1"
    api_port: int = 18080
    metrics_port: int = 0  # the port this process serves /metrics and /healthz on (0: none)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in containers

    @field_validator("body_model")
    @classmethod
    def _one_model(cls, value: str) -> str:
        if "," in value:
            raise ValueError("body_model is the one fast-mode model; put several in body_ensemble")
        return value.strip()

    @field_validator("home", "model_cache", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def blobs(self) -> Path:
        return (self.blob_dir or self.home / "blobs").expanduser().resolve()

    @property
    def coat_pattern_methods(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.coat_patterns.split(",")))

    @property
    def ensemble(self) -> list[str]:
        return [n.strip() for n in self.body_ensemble.split(",") if n.strip()]

    @property
    def body_models(self) -> list[str]:
        """Every body model a body worker must hold: the fast one and the ensemble."""
        return list(dict.fromkeys([self.body_model, *self.ensemble]))

    def weights(self) -> dict[str, float]:
        out = {}
        for item in filter(None, (p.strip() for p in self.ensemble_weights.split(","))):
            name, _, value = item.partition("=")
            out[name.strip()] = float(value)
        return out

    @property
    def calibration_path(self) -> Path:
        return (self.calibration or self.home / "calibration.json").expanduser().resolve()

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
