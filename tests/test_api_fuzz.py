"""The API fuzzed from its own OpenAPI document (schemathesis, generated requests per operation), on a live
server and a database of its own: no 5xx; every refusal a 4xx with a reason; a state-changing request
without a key refused; nothing stored by a refused request (rows and blobs counted before and after)."""
from __future__ import annotations

import asyncio

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.stack_helpers import api_on_new_database, row_counts

EXAMPLES = 12  # generated requests per operation (each sent with and without a key where it changes state)
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
READS_BY_POST = {"/v1/detections/states"}  # many ids in a body: a read, open like every read on loopback
COUNTED = ("images", "detections", "outbox", "individuals", "audit_log", "sites", "properties", "calibrations",
           "api_keys", "identity_answers", "census_runs", "runtime_config_history")
TALLY: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzz_api(pg_dsn, tmp_path_factory):
    """The API on a database of its own (a new database on the tests' server), served over HTTP."""
    with api_on_new_database(pg_dsn, tmp_path_factory.mktemp("fuzz"), owner="fuzzer", rate_limit_per_s=10_000,
                             rate_limit_burst=10_000) as api:
        yield api
    print(f"\nFUZZ answers by status: {dict(sorted(TALLY.items()))}")


def stored(fuzz_api) -> dict:
    out = asyncio.run(row_counts(fuzz_api["dsn"], COUNTED))
    blobs = fuzz_api["blobs"]
    out["blobs"] = sum(1 for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else 0
    return out


def changes_state(case) -> bool:
    return case.method.upper() in STATE_CHANGING and case.operation.path not in READS_BY_POST


def answer(case, fuzz_api, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    before = stored(fuzz_api) if changes_state(case) else None
    response = case.call(base_url=fuzz_api["url"], headers=headers, timeout=60)
    TALLY[str(response.status_code)] = TALLY.get(str(response.status_code), 0) + 1
    where = f"{case.method} {case.formatted_path} ({'key' if key else 'no key'})"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert body.get("error") or body.get("detail"), f"{where}: a refusal without a reason: {body}"
        if before is not None and response.status_code != 409:
            assert stored(fuzz_api) == before, f"{where}: refused {response.status_code}, yet something was stored"
    return response


def operations(url: str) -> list:
    loaded = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in loaded.get_all_operations()]


def test_no_generated_request_gets_a_5xx_and_refusals_store_nothing(fuzz_api):
    """Every operation of the live document, EXAMPLES generated requests each (schemathesis' own pytest
    plugin does not run on this pytest, so hypothesis drives its strategies directly)."""
    ops = operations(fuzz_api["url"])
    assert len(ops) >= 30, [o.label for o in ops]  # the document describes the whole API
    failures = []
    for operation in ops:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        def fuzz(case):
            if changes_state(case):
                r = answer(case, fuzz_api, None)
                assert r.status_code in (401, 403, 404, 405, 413, 422, 429), \
                    f"{case.method} {case.formatted_path} without a key: {r.status_code} {r.text[:300]}"
            answer(case, fuzz_api, fuzz_api["key"])

        try:
            fuzz()
        except AssertionError as exc:
            failures.append(f"{operation.label}: {str(exc).splitlines()[0]}")
    print(f"\nFUZZ {len(ops)} operations, {sum(TALLY.values())} requests, answers {dict(sorted(TALLY.items()))}")
    assert not failures, "\n".join(failures)
