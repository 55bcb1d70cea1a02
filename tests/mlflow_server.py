"""A real ``mlflow server`` subprocess for tests.

Usage::

    with MlflowServer(tmp_path / "server") as server:   # starts it, stops it at the end
        client = MlflowClient(server.uri)
        server.stop()    # simulate an outage
        server.start()   # same port, same store

The store (``mlflow.db`` unless ``backend_store_uri`` is given), the served artifacts (``artifacts/``) and the server's output
(``server.log``, appended across restarts) live in ``tmp_dir``. Starting takes 10-30 s on a
small machine and the server uses about 1 GB of memory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.helpers import free_port

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


class MlflowServer:
    """``mlflow server`` on ``host:port`` with a SQLite store and served artifacts in ``tmp_dir``.

    Args:
        tmp_dir: Directory for the store, artifacts and log (created if missing).
        port: Port to listen on; a free one if None. It stays the same across restarts.
        host: Interface to bind.
        startup_timeout_s: How long :meth:`start` waits for ``GET /health``.
        env: Extra environment variables for the server.
        backend_store_uri: Use this store instead of a new ``tmp_dir/mlflow.db`` (an existing
            database starts faster: creating one takes ~5 s).
    """

    def __init__(
        self,
        tmp_dir: Path,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
        backend_store_uri: str | None = None,
    ) -> None:
        self.dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.backend_store_uri = (
            backend_store_uri or f"sqlite:///{(self.dir / 'mlflow.db').resolve()}"
        )
        self.artifacts_dir = self.dir / "artifacts"
        self.log_path = self.dir / "server.log"
        self.env = {
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            # The job runner starts a handful of extra worker processes that tests never use.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **(env or {}),
        }
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The tracking URI clients use."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MlflowServer:
        """Start the server (a no-op if it runs) and wait until it answers ``/health``."""
        if self.running:
            return self
        if _port_in_use(self.host, self.port):
            # Otherwise the health check below could be answered by someone else's server.
            raise RuntimeError(f"port {self.port} is already in use; cannot start MLflow there")
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", self.host,
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                env={**os.environ, **self.env},
                start_new_session=True,  # own process group: stop() kills uvicorn too
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {self._proc.returncode} during startup:\n"
                    f"{self.log_tail()}"
                )
            try:
                with _NO_PROXY.open(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"mlflow server on {self.uri} not ready after {self.startup_timeout_s:.0f} s:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL); a no-op if stopped."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=timeout_s)
        # uvicorn is a child in the same group; make sure nothing still holds the port.
        self._signal_group(proc, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while _port_in_use(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group id is the pid (start_new_session)
        except ProcessLookupError:
            pass  # the whole group has exited already

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the server's output, for failure messages."""
        if not self.log_path.exists():
            return "(no server log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
