"""The census from the command line and the eval: ask the running stack to re-cluster a property and wait."""
from __future__ import annotations

import time

import httpx

TERMINAL_RUN = ("done", "failed", "abandoned")


def recluster(client: httpx.Client, prop: str, timeout: float = 600.0) -> dict:
    """Request a re-clustering of `prop` and wait for the census service to finish it; the run's row.
    Raises RuntimeError when the run fails or does not finish in time."""
    r = client.post(f"/v1/census/{prop}/recluster")
    if r.status_code != 202:
        raise RuntimeError(f"recluster of {prop!r} refused: {r.status_code} {r.text[:300]}")
    run_id = r.json()["run_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/v1/census/runs/{run_id}").json()
        if run["state"] in TERMINAL_RUN:
            if run["state"] != "done":
                raise RuntimeError(f"census run {run_id} of {prop!r} {run['state']}: {run.get('error')}")
            return run
        time.sleep(0.2)
    raise RuntimeError(f"census run {run_id} of {prop!r} did not finish within {timeout:.0f} s (is the census "
                       "service up? `deer-reid status`)")
