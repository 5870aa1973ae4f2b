"""Fast unit tests of the pure logic: states, decisions, schemas, batching."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import numpy as np
import pytest

from services.body.extractor import embed_in_batches
from shared.components import aggregate
from services.fusion.decision import ASSIGNED, NEW, REVIEW, Thresholds, decide
from services.fusion.scoring import Candidate, score_candidates
from shared.schemas import Features, DetectionEvent, Embedding, MalformedEvent, sex_of
from shared.states import STATES, TERMINAL, is_terminal, machine_may_move

T = Thresholds(match=0.8, new=0.6)


# ---- states --------------------------------------------------------------------------------

def test_terminal_states_are_never_left_by_the_machine():
    for current in TERMINAL:
        for target in STATES:
            assert not machine_may_move(current, target)


def test_pending_states_move_forward_only():
    assert machine_may_move("received", "extracting")
    assert machine_may_move("extracting", "assigned")
    assert machine_may_move("fusing", "failed")
    assert not machine_may_move("fusing", "received")
    assert not machine_may_move("extracting", "received")


def test_unknown_state_is_an_error():
    with pytest.raises(ValueError):
        is_terminal("done")
    with pytest.raises(ValueError):
        machine_may_move("received", "done")


# ---- decision ------------------------------------------------------------------------------

def test_empty_gallery_founds_a_new_individual():
    d = decide([], T)
    assert (d.state, d.individual_id, d.score) == (NEW, None, None)


def test_clear_match_is_assigned_and_high_confidence_flagged():
    d = decide([Candidate(7, 0.95), Candidate(3, 0.5)], T)
    assert (d.state, d.individual_id) == (ASSIGNED, 7)
    assert "high-confidence" in d.flags
    d = decide([Candidate(7, 0.85)], T)
    assert d.state == ASSIGNED and "high-confidence" not in d.flags


def test_uncertain_score_goes_to_review_not_to_a_new_profile():
    d = decide([Candidate(7, 0.7)], T)
    assert (d.state, d.individual_id) == (REVIEW, None)
    assert "manual-review" in d.flags


def test_two_individuals_neck_and_neck_go_to_review():
    d = decide([Candidate(7, 0.90), Candidate(8, 0.89)], T)
    assert d.state == REVIEW and "ambiguous" in d.flags


def test_low_score_founds_new_individual():
    assert decide([Candidate(7, 0.59)], T).state == NEW


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError):
        Thresholds(match=0.5, new=0.7)


def test_identity_score_is_the_best_exemplar_or_the_mean_of_the_best_two():
    assert aggregate([0.5, 0.9, 0.7], "best") == 0.9
    assert aggregate([0.5, 0.9, 0.7], "mean2") == pytest.approx(0.8)
    assert aggregate([0.6], "mean2") == 0.6
    assert aggregate([], "best") is None
    with pytest.raises(ValueError):
        aggregate([0.1], "median")


def test_spec_weighted_mean_weighs_models_and_floors_missing_ones():
    cands = score_candidates({"body:a": {1: 0.9, 2: 0.5}, "body:b": {1: 0.7}}, None, {"a": 3, "b": 1})
    assert [c.individual_id for c in cands] == [1, 2]
    assert cands[0].score == pytest.approx((3 * 0.9 + 0.7) / 4)
    # individual 2 was not among model b's neighbours: it gets b's floor (0.7 here)
    assert cands[1].components == {"body:a": 0.5, "body:b": 0.7}


# ---- schemas -------------------------------------------------------------------------------

def _event(**over):
    base = dict(detection_id=uuid.uuid4(), site="s1", camera="c1", captured_at=datetime.now(timezone.utc),
                cls="buck", box={"x0": 0, "y0": 0, "x1": 10, "y1": 10}, image_sha256="a" * 64,
                crop_jpeg=b"\xff\xd8jpeg")
    base.update(over)
    return DetectionEvent(**base)


def test_detection_event_round_trips_and_carries_the_crop_as_base64():
    event = _event()
    raw = event.to_bytes()
    assert b'"crop_jpeg":"/9hqcGVn"' in raw
    assert DetectionEvent.from_bytes(raw) == event


@pytest.mark.parametrize("raw", [None, b"", b"not json", b"{}", b'{"schema_version": 2}',
                                 b'{"detection_id": "x"}', b"\xff\xfe" * 100])
def test_malformed_bytes_raise_malformed_event(raw):
    with pytest.raises(MalformedEvent):
        DetectionEvent.from_bytes(raw)


def test_bad_class_and_box_are_malformed():
    good = _event().model_dump(mode="json")
    for bad in ({"cls": "elk"}, {"box": {"x0": 5, "y0": 0, "x1": 5, "y1": 10}}, {"image_sha256": "../etc"}):
        import json

        with pytest.raises(MalformedEvent):
            DetectionEvent.from_bytes(json.dumps({**good, **bad}).encode())


def test_embedding_travels_as_compact_float32():
    vec = np.linspace(-1, 1, 1280, dtype=np.float32)
    emb = Embedding.of("m", "m:abc:p", vec, False)
    features = Features(component="body", detection_id=uuid.uuid4(), site="s", camera="c",
                        captured_at=datetime.now(timezone.utc), cls="doe", embeddings=[emb])
    raw = features.to_bytes()
    assert len(raw) < 4 * 1280 * 1.4 + 600  # base64 float32, not a decimal list
    back = Features.from_bytes(raw).embeddings[0]
    assert np.array_equal(back.array(), vec)


def test_embedding_length_must_match_its_dimension():
    with pytest.raises(ValueError):
        Embedding(model="m", version="v", dim=4, random_weights=False, vector=b"\0" * 12)


def test_sex_of_classes():
    assert [sex_of(c) for c in ("buck", "young", "doe", "fawn", "unknown")] == \
        ["male", "male", "female", "unknown", "unknown"]


# ---- batching with out-of-memory -----------------------------------------------------------

def test_out_of_memory_halves_the_batch_and_loses_nothing():
    import torch

    seen = []

    def embed(chunk):
        seen.append(len(chunk))
        if len(chunk) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return chunk.reshape(len(chunk), -1).astype(np.float32)

    images = np.arange(16 * 3, dtype=np.uint8).reshape(16, 3)
    out, batch = embed_in_batches(embed, images, 16)
    assert batch == 4
    assert seen == [16, 8, 4, 4, 4, 4]
    assert np.array_equal(out, images.astype(np.float32))


def test_other_errors_are_not_swallowed():
    def embed(chunk):
        raise ValueError("broken model")

    with pytest.raises(ValueError):
        embed_in_batches(embed, np.zeros((4, 3), np.uint8), 4)


def test_out_of_memory_at_batch_one_is_raised():
    import torch

    def embed(chunk):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        embed_in_batches(embed, np.zeros((2, 3), np.uint8), 2)


# ---- ensembles ---------------------------------------------------------------------------------

def test_ensemble_high_confidence_needs_every_model_above_the_floor():
    strong = Candidate(1, 0.93, {"body:a": 0.95, "body:b": 0.92, "body:c": 0.91})
    d = decide([strong], T)
    assert d.state == ASSIGNED and "high-confidence" in d.flags
    one_weak = Candidate(1, 0.91, {"body:a": 0.99, "body:b": 0.95, "body:c": 0.80})
    d = decide([one_weak], T)
    assert d.state == ASSIGNED and "high-confidence" not in d.flags


def test_ensemble_disagreement_in_the_review_band_goes_to_review():
    t = Thresholds(match=0.78, new=0.6)
    split = Candidate(1, 0.80, {"body:a": 0.95, "body:b": 0.72, "body:c": 0.73})
    d = decide([split], t)
    assert d.state == REVIEW and "model-disagreement" in d.flags
    agreeing = Candidate(1, 0.80, {"body:a": 0.82, "body:b": 0.79, "body:c": 0.79})
    assert decide([agreeing], t).state == ASSIGNED
    # with a fitted fusion the calibrated probability already weighs the models' agreement
    assert decide([split], t, calibrated=True).state == ASSIGNED


def test_settings_split_fast_model_and_ensemble():
    from shared.config import Settings

    s = Settings(body_model="resnet50", body_ensemble="resnet50, efficientnet_b3,vit_base_patch16_224")
    assert s.body_models == ["resnet50", "efficientnet_b3", "vit_base_patch16_224"]
    assert s.weights() == {"resnet50": 0.4, "efficientnet_b3": 0.3, "vit_base_patch16_224": 0.3}
    with pytest.raises(ValueError):
        Settings(body_model="resnet50,efficientnet_b3")


def test_database_urls_are_printed_without_their_password():
    from shared.db import redact_dsn

    assert redact_dsn("postgresql://deer:s3cret@db:5432/deer") == "postgresql://deer:***@db:5432/deer"
    assert redact_dsn("postgresql://deer:p%40ss@db/deer?sslmode=require") == "postgresql://deer:***@db/deer?sslmode=require"
    embedded = "postgresql://postgres:@/postgres?host=/tmp/x/pg"  # no password: the state file keeps it usable
    assert redact_dsn(embedded) == embedded


def test_the_auto_engine_is_openvino_only_where_it_was_measured_faster(monkeypatch):
    """OpenVINO measured 2-3x faster than torch for the convolutional networks in bf16 on a CPU with AMX,
    and no faster for ViT-B/16; nowhere else was it measured, so torch stays there."""
    import torch

    from shared import models

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    lite, vit = models.get_spec("efficientnet_lite0"), models.get_spec("vit_base_patch16_224")
    assert lite.openvino and models.get_spec("resnet50").openvino and not vit.openvino
    for amx in (True, False):
        monkeypatch.setattr(models, "cpu_has_amx", lambda a=amx: a)
        assert models.resolve_engine("auto", lite, cpu, "bf16") == ("openvino" if amx else "torch")
        assert models.resolve_engine("auto", lite, cpu, "fp32") == "torch"
        assert models.resolve_engine("auto", vit, cpu, "bf16") == "torch"
        assert models.resolve_engine("auto", lite, cuda, "bf16") == "torch"
        assert models.resolve_engine("openvino", vit, cpu, "fp32") == "openvino"  # asked for: anywhere on a CPU
        assert models.resolve_engine("torch", lite, cpu, "bf16") == "torch"
    with pytest.raises(ValueError, match="on the CPU"):
        models.resolve_engine("openvino", lite, cuda, "bf16")
    with pytest.raises(ValueError, match="auto, torch, openvino"):
        models.resolve_engine("onnx", lite, cpu, "bf16")


def test_auto_precision_is_bf16_only_where_the_hardware_runs_it_natively(monkeypatch):
    """Any CUDA device was taken as bf16-native; before Ampere (compute capability 8) it emulates bf16."""
    import torch

    from shared import models

    cuda = torch.device("cuda", 0)
    for major, want in ((7, "fp32"), (8, "bf16"), (9, "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert models.resolve_precision("auto", cuda) == want, major
    for has, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(models, "cpu_has_bf16", lambda h=has: h)
        assert models.resolve_precision("auto", torch.device("cpu")) == want
    assert models.resolve_precision("fp32", cuda) == "fp32"
