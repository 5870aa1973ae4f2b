"""`deer-reid soak`: its pure parts, and a soak at CI size on the running stack with every fault injected
once (each service killed with SIGKILL, the broker killed and restarted empty by the supervisor)."""
from __future__ import annotations

import asyncio
import hashlib
import io

import pytest
from PIL import Image

from deer_reid import soak
from tests.stack_helpers import WAIT_S


def test_distinct_images_are_distinct_decodable_and_seeded(nyala_paths):
    photo = nyala_paths[0].read_bytes()
    images = [soak.distinct_image(photo, k) for k in range(20)]
    assert len({hashlib.sha256(i).hexdigest() for i in images}) == 20
    assert soak.distinct_image(photo, 7) == images[7]  # the same k, the same image
    with Image.open(io.BytesIO(images[3])) as im, Image.open(nyala_paths[0]) as original:
        assert 0.8 * original.width - 1 <= im.width <= 0.95 * original.width + 1


def test_fault_plan_spreads_every_fault_over_the_middle_of_the_run():
    plan = soak.fault_plan(1000)
    assert sorted(plan.values()) == sorted(soak.FAULT_ORDER)
    assert min(plan) >= 100 and max(plan) <= 700 and len(plan) == len(soak.FAULT_ORDER)
    assert soak.fault_plan(1000, ()) == {}
    assert len(soak.fault_plan(12)) == len(soak.FAULT_ORDER)  # tiny runs still get every fault, at distinct points


def test_a_soak_with_a_failed_detection_exits_non_zero():
    clean = {"lost": 0, "decided_twice": 0, "failed": 0}
    assert soak.exit_status(clean) == 0
    for key in clean:
        assert soak.exit_status({**clean, key: 1}) == 1, key


def test_counter_total_follows_restarts():
    total = soak.CounterTotal()
    for sample in (5, 9, 12, 2, 7, 7, 0, 4):  # restarted after 12 (from 0 to 2) and after 7 (to 0)
        total.add(sample)
    assert total.total == (12 - 5) + 2 + 5 + 0 + 4


def test_body_events_reads_the_exposition():
    text = ('# HELP deer_events_total Events handled, by outcome\n# TYPE deer_events_total counter\n'
            'deer_events_total{service="body",outcome="ok"} 41.0\n'
            'deer_events_total{service="body",outcome="embedded"} 39.0\n'
            'deer_events_total{service="body",outcome="dead_letter"} 2.0\n'
            'deer_events_created{service="body",outcome="ok"} 1.7e+09\n')
    assert soak.body_events(text) == 39.0 and soak.body_events(text, "ok") == 41.0
    assert soak.body_events("") == 0.0


@pytest.mark.stack
async def test_a_soak_with_every_fault_loses_nothing_and_decides_each_once(stack, nyala_paths, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, p in enumerate(nyala_paths[1100:1110]):  # linked, not copied: the data stays where it is
        (photos / f"{i}-{p.name}").symlink_to(p)
    report = await soak.soak(stack.home, photos, 48, rate=4.0, faults=True, timeout=3 * WAIT_S,
                             headers=stack.auth, progress=False)
    print(f"\nSOAK {report}")
    assert sorted(f["target"] for f in report["faults"]) == sorted(soak.FAULT_ORDER)
    assert all(f["pid"] for f in report["faults"]), report["faults"]
    assert report["submitted"] == 48 and not report["rejected"], report["rejected"]
    assert report["lost"] == 0 and report["failed"] == 0 and report["decided_twice"] == 0, report
    assert report["terminal"] == 48 and report["p50_ms"] <= report["p99_ms"]
    assert stack.broker_restarts >= 1


def test_the_report_counts_states_pipelines_and_why_decisions_were_degraded():
    enhanced = {"mode": "enhanced", "coat": True, "antler": True}
    rows = [
        {"state": "new", "pipeline": enhanced, "result": {"flags": [], "missing": [], "arrived": {}}},
        {"state": "review", "pipeline": enhanced, "result": {"flags": ["degraded"], "missing": ["coat", "antler"],
                                                             "arrived": {"body": "ok", "antler": "failed"}}},
        {"state": "assigned", "pipeline": enhanced, "result": {"flags": ["degraded"], "missing": ["antler"],
                                                               "arrived": {"body": "ok", "antler": "failed"}}},
        {"state": "fusing", "pipeline": {"mode": "fast"}, "result": None},
    ]
    report = soak.decisions_report(rows)
    assert report["states"] == {"new": 1, "review": 1, "assigned": 1, "fusing": 1}
    assert report["degraded"] == 2 and report["degraded_by_timeout"] == 1
    assert report["degraded_by"] == {"coat not arrived": 1, "antler failed": 2}
    assert report["pipelines"] == [{**enhanced, "detections": 3}, {"mode": "fast", "detections": 1}]


def test_an_enhanced_soak_without_faults_fails_when_a_component_timed_out():
    clean = {"lost": 0, "decided_twice": 0, "failed": 0, "mode": "enhanced", "faults": [], "degraded_by_timeout": 1}
    assert soak.exit_status(clean) == 1
    assert soak.exit_status({**clean, "degraded_by_timeout": 0}) == 0
    assert soak.exit_status({**clean, "mode": None}) == 0  # the switches as they were: a component may be off
    assert soak.exit_status({**clean, "faults": [{"target": "coat"}]}) == 0  # a killed component may miss its join


async def test_the_mode_switches_are_put_back_when_the_run_fails(tmp_path, monkeypatch, jpeg_bytes):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes)
    calls = []
    monkeypatch.setattr(soak, "read_state", lambda home: {"api_url": "http://api"})
    monkeypatch.setattr(soak, "switch_pipeline", lambda url, headers, **switches: calls.append(switches) or
                        {k: "before" for k in switches})

    async def interrupted(*_args, **_kwargs):
        raise asyncio.CancelledError  # as Ctrl-C cancels the run's task

    monkeypatch.setattr(soak, "_soak", interrupted)
    with pytest.raises(asyncio.CancelledError):
        await soak.soak(tmp_path, tmp_path, 3, mode="enhanced", progress=False)
    assert calls == [soak.MODE_SWITCHES["enhanced"], {k: "before" for k in soak.MODE_SWITCHES["enhanced"]}]


@pytest.mark.stack
async def test_an_enhanced_soak_waits_for_a_slow_component_whose_queue_flows(stack, db, nyala_paths, tmp_path):
    """Every enhancement on, the run sent at once, and the coat service slowed to two thirds of its speed
    (stopped and continued in turns): it falls behind the body by more than the join timeout, its queue
    flowing, and the join deadlines wait for it: no detection is decided degraded by a component that timed
    out (with the deadlines fixed, as before, this run decided some without coat). The stack's switches are
    what they were after the run. Slowed further, a coat batch of 16 outlasts the test stack's
    DEER_STUCK_AFTER_S (8 s) and the coat queue rightly looks stuck."""
    import httpx

    from tests.conftest import JOIN_TIMEOUT_S
    from tests.stack_helpers import throttled

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, p in enumerate(nyala_paths[1110:1118]):
        (photos / f"{i}-{p.name}").symlink_to(p)
    config = f"{stack.api_url}/v1/config"
    before = httpx.get(config, headers=stack.auth).json()
    async with throttled(stack, "coat", run_s=0.5, stop_s=0.25):
        report = await soak.soak(stack.home, photos, 40, mode="enhanced", timeout=3 * WAIT_S, headers=stack.auth,
                                 progress=False)
    print(f"\nSOAK enhanced {report}")
    assert report["mode"] == "enhanced" and report["pacing"] == "backlog"
    assert [(p["mode"], p["coat"], p["pose"], p["antler"], p["temporal"], p["detections"])
            for p in report["pipelines"]] == [("enhanced", True, True, True, True, 40)]
    assert report["lost"] == 0 and report["failed"] == 0 and report["decided_twice"] == 0, report
    assert report["degraded_by_timeout"] == 0, report["degraded_by"]
    assert soak.exit_status(report) == 0
    # the slow coat came later than the join's first deadline, and its detection waited for it
    coat_after_body = await db.fetchval(
        """SELECT max(extract(epoch FROM c.arrived_at - b.arrived_at)) FROM detections d
           JOIN detection_features b ON b.detection_id = d.id AND b.component = 'body'
           JOIN detection_features c ON c.detection_id = d.id AND c.component = 'coat' AND NOT c.late
           WHERE d.site = $1""", report["site"])
    assert coat_after_body > JOIN_TIMEOUT_S, coat_after_body
    after = httpx.get(config, headers=stack.auth).json()
    assert {k: after[k] for k in soak.MODE_SWITCHES["enhanced"]} == {k: before[k] for k in soak.MODE_SWITCHES["enhanced"]}
