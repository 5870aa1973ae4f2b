"""`deer-reid soak`: its pure parts, and a soak at CI size on the running stack with every fault injected
once (each service killed with SIGKILL, the broker killed and restarted empty by the supervisor)."""
from __future__ import annotations

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
