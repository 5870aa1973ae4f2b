"""`deer-reid up`: the whole system on one machine, and its supervisor.

Starts the embedded PostgreSQL + pgvector and the Tansu broker (unless
DEER_DATABASE_URL / DEER_KAFKA_BOOTSTRAP point at real ones), creates the topics,
applies the migrations, then runs every service as its own process, restarting
any that dies (as a container orchestrator would). Stopping it stops everything
it started; each child also gets SIGTERM if the supervisor itself dies.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from services.api.auth import ensure_local_key
from shared.config import Settings
from shared.db import migrate, redact_dsn
from shared.embedded import EmbeddedBroker, EmbeddedPostgres, die_with_parent, free_port
from shared.models import get_spec, missing_weights_message, weights_available
from shared.topics import ensure_topics

log = logging.getLogger("deer_reid.stack")

SERVICES = ("reconciler", "fusion", "census", "body", "coat", "antler", "pose", "api")
# On one machine the body extractor is the bottleneck and its two OpenMP threads stall each other
# whenever one is preempted, so the light services yield the CPU to it (they fill its idle gaps).
# Production runs the body on its own GPU machine and has no use for this.
YIELDING_NICE = 5
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
# Keep freed pages (no decay) and purge in a background thread: with jemalloc's defaults, torch's
# large short-lived activations are returned to the OS and faulted in again on every batch, which
# measured slower here than glibc (ResNet50 bf16, batch 16: 27-29 img/s default jemalloc, 32-34
# glibc, 38-41 with these settings).
JEMALLOC_CONF = "background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def with_jemalloc(env: dict[str, str]) -> dict[str, str]:
    """`env` with jemalloc preloaded and tuned (unchanged where jemalloc is not installed)."""
    env = dict(env)
    if JEMALLOC.exists() and "jemalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (str(JEMALLOC), env.get("LD_PRELOAD", "")) if p)
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


class StackError(RuntimeError):
    """The stack cannot start; the message names the fix."""


@dataclass
class Child:
    name: str
    port: int
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str] = field(default_factory=dict)  # extra DEER_* settings for the services
    postgres: EmbeddedPostgres | None = None
    broker: EmbeddedBroker | None = None
    children: dict[str, Child] = field(default_factory=dict)
    dsn: str = ""
    bootstrap: str = ""
    admin_key: str = ""
    broker_restarts: int = 0
    postgres_restarts: int = 0
    _stopping: bool = False

    @property
    def home(self) -> Path:
        return self.settings.home

    @property
    def state_file(self) -> Path:
        return self.home / "run" / "stack.json"

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.children['api'].port}"

    def check_models(self) -> None:
        for name in dict.fromkeys([*self.settings.body_models, self.settings.antler_model]):
            try:
                get_spec(name, self.settings.model_cache)
            except KeyError as exc:
                raise StackError(str(exc)) from None
            if not self.settings.allow_random_weights and not weights_available(
                    name, self.settings.model_cache, self.settings.fetch_weights):
                raise StackError(missing_weights_message(name, self.settings.model_cache))

    def start(self) -> None:
        self.check_models()
        for sub in ("logs", "run"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        self.dsn = self.settings.database_url
        if not self.dsn:
            self.postgres = EmbeddedPostgres(self.home / "pg")
            self.dsn = self.postgres.start()
        if "DEER_KAFKA_BOOTSTRAP" in os.environ:
            self.bootstrap = self.settings.kafka_bootstrap
        else:
            self.broker = EmbeddedBroker(free_port(), self.home / "logs" / "broker.log")
            self.bootstrap = self.broker.start()
            renice_tree(self.broker.process.pid, YIELDING_NICE)
        if self.postgres is not None:
            renice_tree(self.postgres.pid, YIELDING_NICE)  # backends fork from it and inherit
        asyncio.run(self._prepare())
        for name in SERVICES:
            port = self.settings.api_port if name == "api" else free_port()
            self.children[name] = Child(name, port)
            self._spawn(self.children[name])
        self.wait_healthy()
        self._write_state("healthy")

    async def _prepare(self) -> None:
        await ensure_topics(self.bootstrap)
        await migrate(self.dsn)
        # The local admin key (in the state directory, owner-only): the CLI and the page's sign-in use it,
        # so a single user never handles keys by hand.
        conn = await asyncpg.connect(self.dsn)
        try:
            self.admin_key = await ensure_local_key(conn, self.home)
        finally:
            await conn.close()

    @property
    def auth(self) -> dict[str, str]:
        """Headers that authenticate as the local admin."""
        return {"Authorization": f"Bearer {self.admin_key}"}

    def service_env(self, child: Child) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()}
        env.update(self.env)
        env.update({
            "DEER_HOME": str(self.home),
            "DEER_DATABASE_URL": self.dsn,
            "DEER_KAFKA_BOOTSTRAP": self.bootstrap,
            "DEER_BODY_MODEL": self.settings.body_model,
            "DEER_BODY_ENSEMBLE": self.settings.body_ensemble,
            "DEER_ALLOW_RANDOM_WEIGHTS": "true" if self.settings.allow_random_weights else "false",
            "DEER_MODEL_CACHE": str(self.settings.model_cache),
            "DEER_METRICS_PORT": str(child.port),
            "DEER_API_PORT": str(self.children["api"].port if "api" in self.children else self.settings.api_port),
            "PYTHONUNBUFFERED": "1",
        })
        return with_jemalloc(env)

    def _spawn(self, child: Child) -> None:
        out = open(self.home / "logs" / f"{child.name}.log", "ab")
        child.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{child.name}"], env=self.service_env(child),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent if child.name == "body" else _yielding_child,
            cwd=Path(__file__).resolve().parent.parent,
        )
        out.close()
        child.started_at = time.monotonic()

    def healthy(self, child: Child) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{child.port}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.children)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                child = self.children[name]
                if child.process.poll() is not None:
                    raise StackError(f"service {name} exited with {child.process.returncode} while starting; "
                                     f"see {self.home / 'logs' / (name + '.log')}")
                if self.healthy(child):
                    pending.discard(name)
            time.sleep(0.2)
        if pending:
            raise StackError(f"services not healthy after {timeout:.0f}s: {sorted(pending)}")

    def supervise_once(self) -> None:
        """Restart any service that died (with a pause that grows if it keeps dying), and the embedded broker:
        it comes back empty on its port, and the reconciler re-creates the topics and re-publishes what was lost."""
        postgres = self.postgres
        if postgres is not None and not self._stopping and not postgres.alive():
            # The services and the API keep running: they retry the database (not ready meanwhile) and
            # reconnect when it is back; the supervisor only brings the server back on its data directory.
            try:
                postgres.restart()
            except Exception as exc:  # noqa: BLE001 - its old backends may still be exiting: next round
                log.warning("the embedded PostgreSQL is down and did not start again yet: %s", exc)
            else:
                log.warning("the embedded PostgreSQL exited; restarted it (crash recovery)")
                renice_tree(postgres.pid, YIELDING_NICE)
                self.postgres_restarts += 1
                self._write_state("healthy")
        broker = self.broker
        if broker is not None and not self._stopping and broker.process is not None \
                and broker.process.poll() is not None:
            log.warning("the embedded broker exited with %s; restarting it", broker.process.returncode)
            broker.start()
            renice_tree(broker.process.pid, YIELDING_NICE)
            self.broker_restarts += 1  # counted once it runs again
            self._write_state("healthy")
        for child in self.children.values():
            if self._stopping or child.process is None or child.process.poll() is None:
                continue
            code = child.process.returncode
            quick = time.monotonic() - child.started_at < 10
            child.restarts += 1
            log.warning("service %s exited with %s; restarting (restart %d)", child.name, code, child.restarts)
            if quick:
                time.sleep(min(2 ** min(child.restarts, 5), 30))
            self._spawn(child)
            self._write_state("healthy")

    def run_forever(self) -> None:
        def request_stop(*_):
            self._stopping = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        while not self._stopping:
            self.supervise_once()
            time.sleep(0.5)
        self.stop()

    def stop(self) -> None:
        self._stopping = True
        for child in self.children.values():
            if child.process and child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + 20
        for child in self.children.values():
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("service %s did not stop in time; killing it", child.name)
                child.process.kill()
                child.process.wait()
        if self.broker:
            self.broker.stop()
        if self.postgres:
            self.postgres.stop()
        self.state_file.unlink(missing_ok=True)

    def _write_state(self, status: str) -> None:
        state = {
            "status": status,
            "supervisor_pid": os.getpid(),
            "api_url": self.api_url,
            # never the password: the embedded database has none, an external one comes from DEER_DATABASE_URL
            "database_url": redact_dsn(self.dsn),
            "kafka_bootstrap": self.bootstrap,
            "body_model": self.settings.body_model,
            "body_ensemble": self.settings.ensemble,
            "random_weights_allowed": self.settings.allow_random_weights,
            "services": {n: {"pid": c.process.pid if c.process else None, "metrics_port": c.port,
                             "restarts": c.restarts} for n, c in self.children.items()},
            "broker": None if self.broker is None or self.broker.process is None else
            {"pid": self.broker.process.pid, "restarts": self.broker_restarts},
            "postgres": None if self.postgres is None or not self.postgres.alive() else
            {"pid": self.postgres.pid, "restarts": self.postgres_restarts},
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)


def _yielding_child() -> None:
    die_with_parent()
    os.nice(YIELDING_NICE)


def renice_tree(pid: int, nice: int) -> None:
    """Give a running process and its children a lower priority (best effort)."""
    import psutil

    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            proc.nice(max(proc.nice(), nice))
    except psutil.Error:
        pass


def read_state(home: Path) -> dict | None:
    path = home / "run" / "stack.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def service_health(state: dict, name: str, metrics_host: str) -> dict | str:
    """A running stack's service's own /healthz document (a 503 carries it too), or why there is none."""
    import urllib.error
    import urllib.request

    port = state.get("services", {}).get(name, {}).get("metrics_port")
    if not port:
        return "no health endpoint"
    url = f"{state['api_url']}/healthz" if name == "api" else f"http://{metrics_host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # 503: not ready, with the same document
        try:
            return json.loads(exc.read())
        except ValueError:
            return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"unreachable: {exc}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
