"""Fixtures: the real broker and the real database, started here; real images from ../shared/data."""
from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from shared.embedded import EmbeddedBroker, EmbeddedPostgres, free_port

# The suite runs on what its fixtures start and in caches of its own: never on servers a shell names
# (a stack fixture would silently use them), never in the user's model cache or state home.
for _name in ("DEER_DATABASE_URL", "DEER_KAFKA_BOOTSTRAP", "DEER_API_URL", "DEER_API_KEY", "DEER_HOME",
              "DEER_BLOB_DIR"):
    os.environ.pop(_name, None)
# (eval's feature cache lives beside the model cache: both in this temporary folder)
os.environ["DEER_MODEL_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="deer-test-cache-"), "models")
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="deer-test-state-")

REPO = Path(__file__).resolve().parent.parent
NYALA = Path(os.environ.get("DEER_TEST_DATA", REPO.parent / "shared" / "data" / "nyala-train"))


@pytest.fixture(scope="session")
def nyala_rows() -> list[dict]:
    """metadata.csv of the real labelled images (evaluation data, read in place, never copied)."""
    meta = NYALA / "metadata.csv"
    if not meta.exists():
        pytest.fail(f"test data missing: {meta} (../shared must sit beside the repository)")
    with open(meta) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def nyala_paths(nyala_rows) -> list[Path]:
    return [NYALA / r["path"] for r in nyala_rows]


def labelled_subset(root: Path, nyala_rows: list[dict], nyala_paths: list[Path], identities: int,
                    per_identity: int) -> Path:
    """A labelled folder of the test's own (never in the repository) with real photos: the first
    `identities` identities with at least `per_identity` photos, that many photos each."""
    import shutil

    (root / "img").mkdir(parents=True)
    by_id: dict[str, list] = {}
    for row, path in zip(nyala_rows, nyala_paths):
        by_id.setdefault(row["identity"], []).append((row, path))
    lines = ["path,identity,viewpoint,encounter"]
    for items in [v[:per_identity] for v in by_id.values() if len(v) >= per_identity][:identities]:
        for row, path in items:
            rel = f"img/{row['identity']}_{path.name}"
            shutil.copyfile(path, root / rel)
            lines.append(f"{rel},{row['identity']},{row['viewpoint']},{row['encounter']}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def viewpoint_cache(tmp_path_factory, nyala_rows, nyala_paths) -> Path:
    """A model cache holding a viewpoint classifier `deer-reid train viewpoint` fitted on 20 real identities
    (the stack's pose service uses it; the body networks' weights are copied in from their packages)."""
    from deer_reid.training.viewpoint import ViewpointConfig, train_viewpoint
    from shared.config import Settings

    data = labelled_subset(tmp_path_factory.mktemp("viewpoints"), nyala_rows, nyala_paths, 20, 6)
    cache = tmp_path_factory.mktemp("models")
    settings = Settings(model_cache=cache, home=tmp_path_factory.mktemp("train-home"))
    train_viewpoint(data, ViewpointConfig(holdout_identities=4, validation_identities=4), settings, progress=False)
    return cache


@pytest.fixture
def jpeg_bytes(nyala_paths) -> bytes:
    return nyala_paths[0].read_bytes()


def make_jpeg(width: int = 64, height: int = 48, **save_args) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(out, format="JPEG", **save_args)
    return out.getvalue()


def zip_of(entries: dict[str, bytes], *, links: tuple[str, ...] = ()) -> bytes:
    """A zip archive of `entries` (deflated); names in `links` are stored as symbolic links to their bytes."""
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in links:
                info.external_attr = (0o120777 << 16)
            z.writestr(info, data)
    return out.getvalue()


def tar_of(entries: dict[str, bytes], mode: str = "w:gz", *, links: dict[str, str] | None = None) -> bytes:
    """A tar archive (gzip by default) of `entries`, plus symbolic links name -> target."""
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            t.addfile(info)
    return out.getvalue()


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory):
    """A real PostgreSQL + pgvector with the migrations applied."""
    import asyncio

    from shared.db import migrate

    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    dsn = server.start()
    asyncio.run(migrate(dsn))
    yield dsn
    server.stop()


@pytest.fixture(scope="session")
def broker():
    """A real Kafka-protocol broker (Tansu, memory storage)."""
    b = EmbeddedBroker(free_port())
    b.start()
    yield b
    b.stop()


# The test stack's join timeout: short, yet long enough for a pose round trip on a busy 2-core CI runner
# (3 s was not: one CI run decided a pose-requested detection degraded).
JOIN_TIMEOUT_S = 5


@pytest.fixture(scope="session")
def stack(tmp_path_factory, viewpoint_cache):
    """The whole system as `deer-reid up` runs it, supervised (a killed service is restarted)."""
    from deer_reid.stack import Stack
    from tests.stack_helpers import supervised
    from shared.config import Settings

    settings = Settings(home=tmp_path_factory.mktemp("stack"), api_port=free_port(), body_model="efficientnet_lite0",
                        body_ensemble="efficientnet_lite0,efficientnet_lite1", model_cache=viewpoint_cache)
    # Short reconciler timings so that lost work is found within the tests' patience, and a short
    # join timeout so that a component that never comes costs seconds.
    s = Stack(settings, env={"DEER_STUCK_AFTER_S": "8", "DEER_QUEUED_MAX_S": "30",
                             "DEER_RECONCILE_EVERY_S": "1", "DEER_MAX_ATTEMPTS": "40",
                             "DEER_JOIN_TIMEOUT_S": str(JOIN_TIMEOUT_S), "DEER_LOG_LEVEL": "INFO",
                             # a property's calibration is refitted from a handful of answers (the census tests'),
                             # and the census re-clusters only when a test asks: every test module shares this
                             # stack, and a run on its own would move another test's detections under it
                             # (test_census_loop.py tests the schedule itself)
                             "DEER_CENSUS_REFIT_MIN_ANSWERS": "6", "DEER_CENSUS_REFIT_MIN_EACH": "3",
                             "DEER_CENSUS_REFIT_EVERY": "1", "DEER_CENSUS_AFTER_DECISIONS": "1000000",
                             "DEER_CENSUS_EVERY_S": "31536000"})
    s.start()
    with supervised(s):
        yield s
    s.stop()


@pytest.fixture
async def db(stack):
    import asyncpg

    from shared.db import _init_connection

    conn = await asyncpg.connect(stack.dsn)
    await _init_connection(conn)  # the services' codecs: jsonb as Python values, vectors as numpy
    yield conn
    await conn.close()




@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's headless Chromium driven by Selenium (the system's driver: nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    # the system's driver: nothing is downloaded
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
