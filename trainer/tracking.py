"""Experiment tracking that never stops or stalls training and never loses a metric.

Two records are kept for every run directory:

* ``metrics.jsonl`` -- the local record, written synchronously by :meth:`Tracker.log_metrics`
  and flushed on every call, so it survives the process dying. One JSON object per call::

      {"step": 120, "timestamp": 1732550000123, "metrics": {"loss": 0.41, "l0": 31.0}}

  ``timestamp`` is in milliseconds since the epoch and is the same timestamp sent to MLflow.
  Non-finite values are written as Python's ``json`` writes them (``NaN``, ``Infinity``).
  :func:`read_metrics` reads it back.
* MLflow -- every call becomes an *operation* in an in-memory queue served in order by one
  background thread. When the server cannot be reached the thread logs one warning, keeps the
  operation and retries with a backoff capped at a few seconds; the training thread never waits.
  An operation that MLflow rejects for good (an invalid metric name, a changed parameter value)
  is logged and dropped, so one bad record cannot block the queue. Whatever is still queued when
  :meth:`Tracker.close` gives up waiting goes to ``mlflow_unsent.jsonl``, which
  :func:`sync_unsent` (``patchsae sync-mlflow RUN_DIR``) sends later.

Other files in the run directory:

* ``mlflow_run.json`` -- ``{"tracking_uri", "experiment", "experiment_id", "run_id",
  "run_name"}``, written as soon as the MLflow run exists; :func:`read_run_info` reads it, and a
  resumed job passes its ``run_id`` to :class:`Tracker` to continue the same run.
* ``mlflow_unsent.jsonl`` -- one operation per line, in order, appended in segments that each
  begin with a ``start_run`` operation, so every segment can be sent on its own::

      {"op": "start_run", "tracking_uri": str, "experiment": str, "run_name": str,
       "run_id": str | null, "token": str, "timestamp": int}
      {"op": "params", "params": {str: str}}
      {"op": "metrics", "step": int, "timestamp": int, "metrics": {str: float}}
      {"op": "tags", "tags": {str: str}}
      {"op": "artifact", "path": "/absolute/file", "artifact_path": str | null}
      {"op": "end_run", "status": "FINISHED", "timestamp": int}

Sending is idempotent, so an operation that may or may not have reached the server before a
failure is simply sent again: metrics keep their original timestamp (MLflow's SQL stores ignore
an exact duplicate), re-logging a parameter with the same value is a no-op, and a run is tagged
with a random ``patchsae.tracker_token`` so that creating it is never done twice.

MLflow's HTTP client retries a failed request 7 times with exponential backoff and waits up to
120 s per request by default, i.e. minutes per call when the server is down. While a tracker (or a
sync) is active, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` default
to 0 and 20 s, because this module retries on its own schedule. MLflow reads these variables from
the process environment on every request, so the defaults are set in ``os.environ`` -- only for
variables the user has not set -- and removed again when the last tracker closes.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from patchsae.trainer.checkpoint import disk_full_error, exception_chain, is_disk_full

if TYPE_CHECKING:  # mlflow is imported lazily: importing it takes seconds
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "mlflow_run.json"
UNSENT_FILE = "mlflow_unsent.jsonl"
SYNC_COMMAND = "patchsae sync-mlflow"

# MLflow's limits for one log_batch call and for values (mlflow.utils.validation).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000

TOKEN_TAG = "patchsae.tracker_token"
"""Run tag holding a random token per tracker, so a retried or re-synced run creation finds the
run an earlier attempt may already have created instead of creating a second one."""

HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
"""MLflow HTTP settings applied while a tracker is active, unless the user set them."""

SERVER_ERROR_ATTEMPTS = 3
"""A request failing with a server error (5xx) this many times while the server answers other
requests is treated as a bad record rather than an outage, and dropped."""

Op = dict[str, Any]
"""One queued MLflow operation; see the module docstring for the shapes."""

# How an exception from MLflow is handled.
_OUTAGE = "outage"  # server unreachable / timed out: keep the operation, retry later
_SERVER_ERROR = "server-error"  # 5xx / 429 / unknown: retry; drop if the server is otherwise fine
_PERMANENT = "permanent"  # the server rejected this record: drop it
_FATAL = "fatal"  # MLflow cannot work with this URI at all: stop sending, keep everything


class MlflowConfigError(RuntimeError):
    """MLflow cannot be used with the configured tracking URI (bad scheme, rejected store,
    missing credentials); retrying will not help."""


class SyncError(RuntimeError):
    """:func:`sync_unsent` could not send the records; the unsent file is left in place."""


# --------------------------------------------------------------------------------------------
# Local records


def resolve_tracking_uri(configured: str | None, run_dir: Path) -> str:
    """The MLflow tracking URI to use: ``configured`` if set, else ``$MLFLOW_TRACKING_URI``, else
    a SQLite store inside the run directory (``sqlite:///<run_dir>/mlflow.db``)."""
    if configured:
        return configured
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    return f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Read ``metrics.jsonl``: ``{key: [(step, value), ...]}`` sorted by step.

    If a key was logged more than once for a step (a job resumed from an earlier checkpoint
    re-logs the steps after it), the last record wins. A line that cannot be parsed (the tail of a
    write cut short by a crash) is skipped with a warning.
    """
    path = Path(run_dir) / METRICS_FILE
    by_key: dict[str, dict[int, float]] = {}
    if not path.exists():
        return {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
                metrics = record["metrics"]
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s:%d: skipping an unreadable line (%s)", path, lineno, e)
                continue
            for key, value in metrics.items():
                by_key.setdefault(key, {})[step] = float(value)
    return {key: sorted(steps.items()) for key, steps in by_key.items()}


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    """The contents of ``mlflow_run.json`` (tracking_uri, experiment, experiment_id, run_id,
    run_name), or None if no MLflow run was created for this run directory yet."""
    path = Path(run_dir) / RUN_INFO_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    # Write-then-rename, so a crash never leaves a half-written file for the resumed job.
    path = Path(run_dir) / RUN_INFO_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _open_for_append(path: Path) -> IO[bytes]:
    """Open a JSON-lines file for appending, unbuffered (``_append_line`` writes whole lines).
    If a crash cut its last line short, start on a new line, so the first new record is not
    glued to the broken one."""
    f = path.open("ab", buffering=0)
    if f.tell() > 0:
        with path.open("rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                _append_line(f, "", path)
    return f


def _append_line(f: IO[bytes], line: str, path: Path) -> None:
    """Append ``line`` and a newline, or nothing: a failed write (a full disk) is cut off again,
    so the file stays one record per line, and a full disk raises ``DiskFullError``."""
    size = os.fstat(f.fileno()).st_size
    data = memoryview((line + "\n").encode("utf-8"))
    try:
        while data:
            data = data[f.write(data) :]
    except OSError as err:
        os.ftruncate(f.fileno(), size)
        if is_disk_full(err):
            raise disk_full_error(f"the metrics log {path.name}", path) from err
        raise


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: dict[str, Any], size: int) -> Iterator[dict[str, Any]]:
    keys = list(items)
    for i in range(0, len(keys), size):
        yield {k: items[k] for k in keys[i : i + size]}


def _truncate(value: Any, limit: int, what: str, key: str) -> str:
    text = str(value)
    if len(text) > limit:
        log.warning(
            "MLflow %s %r is %d characters long; sending the first %d", what, key, len(text), limit
        )
        text = text[:limit]
    return text


# --------------------------------------------------------------------------------------------
# MLflow HTTP settings


class _HttpDefaults:
    """Reference-counted :data:`HTTP_DEFAULTS` in ``os.environ`` (see the module docstring)."""

    _lock = threading.Lock()
    _users = 0
    _applied: dict[str, str] = {}

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                for name, value in HTTP_DEFAULTS.items():
                    if name not in os.environ:
                        os.environ[name] = value
                        cls._applied[name] = value
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                for name, value in cls._applied.items():
                    # Leave the variable alone if someone changed it in the meantime.
                    if os.environ.get(name) == value:
                        del os.environ[name]
                cls._applied.clear()


# --------------------------------------------------------------------------------------------
# Error classification


def _classify_status(status: int) -> str:
    if status in (401, 403):
        return _FATAL  # credentials: every request will fail the same way
    if status in (408, 429) or status >= 500:
        return _SERVER_ERROR
    if 400 <= status < 500:
        return _PERMANENT
    return _SERVER_ERROR


def _classify(exc: BaseException) -> str:
    """How to handle an exception raised while sending an operation."""
    import requests
    import urllib3
    from mlflow.exceptions import MlflowException

    bad_url = (
        requests.exceptions.InvalidURL,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
    )
    if is_disk_full(exc):
        return _OUTAGE  # a full disk under a local store: keep the records until space returns
    for e in exception_chain(exc):  # MLflow wraps network errors, keeping them as the cause
        if isinstance(e, (MlflowConfigError, *bad_url)):
            return _FATAL
        if isinstance(e, requests.HTTPError) and e.response is not None:
            return _classify_status(e.response.status_code)  # e.g. an artifact upload
        network_errors = (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            ConnectionError,
            TimeoutError,
            socket.gaierror,
        )
        if isinstance(e, network_errors):
            return _OUTAGE
    if isinstance(exc, MlflowException):
        return _classify_status(exc.get_http_status_code())
    if isinstance(exc, (OSError, ValueError, TypeError)):
        return _PERMANENT  # a local file that is gone or unreadable, a value MLflow refuses
    return _SERVER_ERROR


def _describe(exc: BaseException, limit: int = 300) -> str:
    """A one-line summary of an exception, without a final period (callers add their own)."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip().rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of the chain: for an outage, e.g. "ConnectionRefusedError:
    [Errno 111] Connection refused" rather than MLflow's long wrapper message."""
    return list(exception_chain(exc))[-1]


def _uri_help(uri: str) -> str:
    return (
        f"Check the tracking URI {uri!r}: set tracking.tracking_uri in the config or "
        "MLFLOW_TRACKING_URI (e.g. http://HOST:5000, or sqlite:///PATH/mlflow.db)."
    )


# --------------------------------------------------------------------------------------------
# Sending operations


def _group_len(ops: Sequence[Op], start: int) -> int:
    """How many operations from ``ops[start]`` go in one request: consecutive metrics
    operations are batched up to MLflow's limit, anything else goes alone."""
    if ops[start]["op"] != "metrics":
        return 1
    n, total = 0, 0
    for op in itertools.islice(ops, start, None):  # ops may be a deque: no slicing
        if op["op"] != "metrics" or total + len(op["metrics"]) > MAX_METRICS_PER_BATCH:
            break
        total += len(op["metrics"])
        n += 1
    return max(n, 1)


def _count_records(ops: Sequence[Op]) -> int:
    """Metric values, params, tags and artifacts in ``ops`` (run start/end are not records)."""
    n = 0
    for op in ops:
        if op["op"] in ("metrics", "params", "tags"):
            n += len(op[op["op"]])  # the payload is stored under the op's name
        elif op["op"] == "artifact":
            n += 1
    return n


def _local_artifact_location(uri: str) -> str | None:
    """For a SQLite store, keep artifacts next to the database: MLflow's default would be
    ``./mlruns`` relative to whatever the working directory happens to be."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = Path(uri[len(prefix) :].split("?", 1)[0])
    return (db.resolve().parent / "mlartifacts").as_uri()


class _Sender:
    """Applies operations to one MLflow tracking URI, in order. Used by the tracker's thread and
    by :func:`sync_unsent`. Raises on failure; the caller decides whether to retry."""

    def __init__(self, tracking_uri: str, run_dir: Path) -> None:
        self.tracking_uri = tracking_uri
        self.run_dir = Path(run_dir)
        self.run_id: str | None = None
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            try:
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            except Exception as e:  # whatever the store registry raises: the URI is unusable
                detail = _describe(e)
                if type(e).__name__.startswith("Unsupported"):
                    # MLflow's message talks about the model registry, which is confusing here.
                    scheme = self.tracking_uri.partition(":")[0]
                    detail = f"MLflow does not support the scheme {scheme!r} ({detail})"
                raise MlflowConfigError(
                    f"MLflow cannot use tracking URI {self.tracking_uri!r}: {detail}"
                ) from e
        return self._client

    def healthy(self) -> bool:
        """Whether the server answers a simple request (tells a bad record from an outage)."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as e:  # any failure means "not healthy"; the caller keeps retrying
            log.debug("MLflow health probe failed: %s", _describe(e))
            return False
        return True

    def send(self, group: Sequence[Op]) -> int:
        """Apply one group (see :func:`_group_len`); returns the number of records MLflow
        accepted. Records it rejects for good are logged and dropped."""
        op = group[0]
        kind = op["op"]
        if kind == "start_run":
            self._start_run(op)
            return 0
        if self.run_id is None:
            raise RuntimeError(f"MLflow operation {kind!r} before start_run")  # a bug here
        if kind == "metrics":
            from mlflow.entities import Metric

            metrics = [
                Metric(key, value, o["timestamp"], o["step"])
                for o in group
                for key, value in o["metrics"].items()
            ]
            return self._log_batch(metrics, "metrics", lambda m: self._batch(metrics=m))
        if kind == "params":
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in op["params"].items()]
            return self._log_batch(params, "params", lambda p: self._batch(params=p))
        if kind == "tags":
            from mlflow.entities import RunTag

            tags = [RunTag(k, v) for k, v in op["tags"].items()]
            return self._log_batch(tags, "tags", lambda t: self._batch(tags=t))
        if kind == "artifact":
            self.client.log_artifact(self.run_id, op["path"], op.get("artifact_path"))
            return 1
        if kind == "end_run":
            if op["status"] != "RUNNING":  # RUNNING: interrupted, to be resumed; leave it open
                self.client.set_terminated(self.run_id, op["status"], end_time=op["timestamp"])
            return 0
        raise ValueError(f"unknown MLflow operation {kind!r}")

    def _batch(self, **entities: Any) -> None:
        assert self.run_id is not None
        self.client.log_batch(self.run_id, synchronous=True, **entities)

    def _log_batch(self, items: list[Any], what: str, send: Callable[[list[Any]], None]) -> int:
        rejected: list[tuple[Any, BaseException]] = []
        sent = self._bisect(items, send, rejected)
        if rejected:
            keys = ", ".join(sorted({getattr(item, "key", "?") for item, _ in rejected}))
            log.warning(
                "MLflow rejected %d of %d %s (keys: %s): %s. Dropped them%s.",
                len(rejected),
                len(items),
                what,
                keys,
                _describe(rejected[0][1]),
                "; they remain in metrics.jsonl" if what == "metrics" else "",
            )
        return sent

    def _bisect(
        self,
        items: list[Any],
        send: Callable[[list[Any]], None],
        rejected: list[tuple[Any, BaseException]],
    ) -> int:
        """Send ``items``; if MLflow rejects the batch for good, split it to find and drop only
        the bad records (one bad metric name must not cost a thousand good values)."""
        try:
            send(items)
            return len(items)
        except Exception as e:  # classified: only a permanent rejection is handled here
            if _classify(e) != _PERMANENT:
                raise
            if len(items) == 1:
                rejected.append((items[0], e))
                return 0
        mid = len(items) // 2
        return self._bisect(items[:mid], send, rejected) + self._bisect(items[mid:], send, rejected)

    def _start_run(self, op: Op) -> None:
        """Create or reuse the experiment, then continue ``op["run_id"]`` or create the run."""
        from mlflow.exceptions import MlflowException

        client = self.client
        name = op["experiment"]
        experiment = client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage != "active":
            raise MlflowConfigError(
                f"MLflow experiment {name!r} is deleted in {self.tracking_uri!r}; restore it "
                "(`mlflow experiments restore`) or set tracking.experiment to another name."
            )
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(
                    name, artifact_location=_local_artifact_location(self.tracking_uri)
                )
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # Another process created it between our lookup and create.
                created = client.get_experiment_by_name(name)
                assert created is not None  # it exists: creating it clashed
                experiment_id = created.experiment_id

        run_id = op.get("run_id")
        if run_id:
            run_id = self._continue_run(run_id)
        if run_id is None and op.get("token"):
            # An earlier attempt may have created the run before failing (or before the
            # process gave up on it); never create it twice.
            found = client.search_runs(
                [experiment_id], f"tags.`{TOKEN_TAG}` = '{op['token']}'", max_results=1
            )
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            tags = {TOKEN_TAG: op["token"]} if op.get("token") else None
            run = client.create_run(
                experiment_id, start_time=op.get("timestamp"), tags=tags, run_name=op["run_name"]
            )
            run_id = run.info.run_id
            log.info(
                "MLflow run %s created in experiment %r at %s", run_id, name, self.tracking_uri
            )
        self.run_id = run_id
        _write_run_info(
            self.run_dir,
            {
                "tracking_uri": self.tracking_uri,
                "experiment": name,
                "experiment_id": experiment_id,
                "run_id": run_id,
                "run_name": op["run_name"],
            },
        )

    def _continue_run(self, run_id: str) -> str | None:
        """Reopen an existing run on resume; None if it cannot be continued."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning(
                "MLflow run %s does not exist at %s; starting a new run", run_id, self.tracking_uri
            )
            return None
        if run.info.lifecycle_stage != "active":
            log.warning("MLflow run %s is deleted; starting a new run", run_id)
            return None
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        log.info("Continuing MLflow run %s at %s", run_id, self.tracking_uri)
        return run_id


# --------------------------------------------------------------------------------------------
# Trackers


class Tracker:
    """Logs to ``metrics.jsonl`` at once and to MLflow from a background thread (rank 0 only).

    Args:
        run_dir: The run directory (created if missing).
        enabled: Log to MLflow. If False, only ``metrics.jsonl`` is written.
        tracking_uri: See :func:`resolve_tracking_uri`.
        experiment: MLflow experiment name (created if missing).
        run_name: MLflow run name, used when a new run is created.
        run_id: Continue this MLflow run (on resume; see :func:`read_run_info`). If it does not
            exist in the store, a new run is created.
        flush_timeout_s: How long :meth:`close` waits for unsent records.
        max_backoff_s: Cap on the wait between retries while the server is unreachable.
        system_metrics_every_s: Once the run exists, MLflow's own system-metrics monitor samples
            CPU, memory, disk, network (and NVIDIA GPUs, through nvidia-ml-py) this often and
            logs them as ``system/*`` metrics until :meth:`close`; 0: off. Samples taken while
            the server is down are MLflow's to drop: they are not part of the outbox.

    Values are converted with ``float``/``str`` on the calling thread, so a value that is not a
    number raises there (a bug in the caller, surfaced at once). Nothing else raises: MLflow
    problems are logged and retried in the background, and records stay in memory until sent
    (about 200 bytes per metric value), so a long outage costs memory, never data.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        tracking_uri: str | None,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        flush_timeout_s: float = 120.0,
        max_backoff_s: float = 5.0,
        system_metrics_every_s: float = 0.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.flush_timeout_s = flush_timeout_s
        self.max_backoff_s = max_backoff_s
        self.tracking_uri = resolve_tracking_uri(tracking_uri, self.run_dir) if enabled else None

        self._cond = threading.Condition()  # guards everything below and the metrics file
        self._ops: deque[Op] = deque()
        self._run_id: str | None = None
        self._closed = False
        self._closing = False  # close() is waiting for the queue to drain
        self._abandoned = False  # close() gave up and saved the queue; the thread must stop
        self._disabled = False  # a fatal configuration error: nothing more is sent
        self._worker_done = False
        self._metrics_file = _open_for_append(self.run_dir / METRICS_FILE)
        self._thread: threading.Thread | None = None
        self._system_metrics_every_s = system_metrics_every_s
        self._monitor: Any = None

        self._token = uuid.uuid4().hex
        self._start_op: Op = {
            "op": "start_run",
            "tracking_uri": self.tracking_uri,
            "experiment": experiment,
            "run_name": run_name,
            "run_id": run_id,
            "token": self._token,
            "timestamp": _now_ms(),
        }
        if not enabled:
            return
        if (self.run_dir / UNSENT_FILE).exists():
            log.warning(
                "%s holds MLflow records an earlier job could not send; send them with `%s %s`",
                self.run_dir / UNSENT_FILE,
                SYNC_COMMAND,
                self.run_dir,
            )
        _HttpDefaults.acquire()
        self._ops.append(self._start_op)
        self._thread = threading.Thread(target=self._serve, name="patchsae-mlflow", daemon=True)
        self._thread.start()

    # ---- API used by the training loop ------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once the run exists on the server, else None."""
        with self._cond:
            return self._run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters; values are converted with ``str`` and cut to MLflow's 6000 chars."""
        clean = {str(k): _truncate(v, MAX_PARAM_VAL_LENGTH, "param", k) for k, v in params.items()}
        self._enqueue(
            [{"op": "params", "params": c} for c in _chunks(clean, MAX_PARAMS_TAGS_PER_BATCH)]
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append the metrics to ``metrics.jsonl`` (flushed) and queue them for MLflow."""
        record = {
            "step": int(step),
            "timestamp": _now_ms(),
            "metrics": {str(k): float(v) for k, v in metrics.items()},
        }
        line = json.dumps(record)
        ops = [
            {**record, "op": "metrics", "metrics": chunk}
            for chunk in _chunks(dict(record["metrics"]), MAX_METRICS_PER_BATCH)  # type: ignore[call-overload]
        ]
        with self._cond:  # one critical section: the file and the queue never disagree
            self._check_open()
            self._enqueue_locked(ops)  # first: MLflow may still get what the disk cannot hold
            _append_line(self._metrics_file, line, self.run_dir / METRICS_FILE)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file. It is read when the upload happens, so keep it until :meth:`close`."""
        path = Path(path).resolve()
        if not path.is_file():
            log.warning("Not logging %s to MLflow: it is not a file", path)
            return
        self._enqueue([{"op": "artifact", "path": str(path), "artifact_path": artifact_path}])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags; values are converted with ``str`` and cut to MLflow's 8000 chars."""
        clean = {str(k): _truncate(v, MAX_TAG_VAL_LENGTH, "tag", k) for k, v in tags.items()}
        self._enqueue(
            [{"op": "tags", "tags": c} for c in _chunks(clean, MAX_PARAMS_TAGS_PER_BATCH)]
        )

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until everything queued so far was sent (or dropped).
        Returns whether the queue is empty. The training loop has no need to call this."""
        with self._cond:
            self._cond.wait_for(self._idle, timeout=timeout_s)
            return not self._ops

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with ``status`` (FINISHED, FAILED, KILLED; RUNNING leaves it open
        for a job that will resume), waiting up to ``flush_timeout_s`` for the queue; save what
        is left to ``mlflow_unsent.jsonl``."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._metrics_file.close()
            if self._thread is None:
                return
            monitor, self._monitor = self._monitor, None
        if monitor is not None:  # its last samples go out before the run ends
            monitor.finish()
        with self._cond:
            self._ops.append({"op": "end_run", "status": status, "timestamp": _now_ms()})
            self._closing = True
            self._cond.notify_all()
            try:
                if not self._cond.wait_for(self._idle, timeout=self.flush_timeout_s):
                    log.info("Waited %.0f s for MLflow; giving up", self.flush_timeout_s)
            finally:  # even when interrupted (Ctrl-C) while waiting: save what is left
                # Why records are left, decided before the thread is told to stop.
                if self._disabled:
                    reason = f"MLflow could not be used with {self.tracking_uri!r}"
                elif self._worker_done:
                    reason = "the MLflow thread stopped (see the error above)"
                else:
                    reason = f"the MLflow server at {self.tracking_uri} could not be reached"
                pending = list(self._ops)
                self._ops.clear()
                self._abandoned = True
                self._cond.notify_all()
                run_id = self._run_id
        try:
            if pending:
                self._save_unsent(pending, run_id, reason)
            else:
                log.info("MLflow: all records sent to %s (run %s)", self.tracking_uri, run_id)
        finally:
            # The thread stops at its next step; it only outlives this join while stuck in a
            # request (at most MLFLOW_HTTP_REQUEST_TIMEOUT), and it is a daemon.
            self._thread.join(timeout=1.0)
            _HttpDefaults.release()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")

    # ---- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Tracker for {self.run_dir} is closed")

    def _enqueue(self, ops: list[Op]) -> None:
        with self._cond:
            self._check_open()
            self._enqueue_locked(ops)

    def _enqueue_locked(self, ops: list[Op]) -> None:
        if self._thread is None:
            return  # MLflow is off: only metrics.jsonl is written
        self._ops.extend(ops)
        self._cond.notify_all()

    def _start_system_metrics(self) -> None:
        """Start MLflow's system-metrics monitor on the new run (called with the lock held)."""
        if self._system_metrics_every_s <= 0 or self._monitor is not None or self._closed:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self._run_id,
                sampling_interval=self._system_metrics_every_s,
                samples_before_logging=1,
                resume_logging=True,  # a resumed run continues its step count
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - system metrics are a nicety, never a failure
            log.warning("MLflow system metrics are off: %s", _describe(e))
            self._monitor = None

    def _idle(self) -> bool:
        # Nothing left that the thread will still send (called with the lock held).
        return not self._ops or self._disabled or self._worker_done

    def _save_unsent(self, pending: list[Op], run_id: str | None, reason: str) -> None:
        """Append the unsent records to the run directory's ``mlflow_unsent.jsonl``; where that
        disk is full, to the system's temp folder; say where (or that neither had room)."""
        if pending[0]["op"] != "start_run":
            # Make the segment self-contained: it continues the run this tracker created.
            pending.insert(0, {**self._start_op, "run_id": run_id or self._start_op["run_id"]})
        text = "".join(json.dumps(op) + "\n" for op in pending)
        count, why = _count_records(pending), reason[0].upper() + reason[1:]
        fallback = Path(tempfile.gettempdir()) / f"{UNSENT_FILE}.{self._token}"
        for path in (self.run_dir / UNSENT_FILE, fallback):
            try:  # append (never clobber an earlier segment), all of it or nothing
                with _open_for_append(path) as f:
                    _append_line(f, text[:-1], path)
                break
            except OSError as err:
                log.warning("could not save unsent MLflow records to %s: %s", path, err)
                if path.is_file() and not path.stat().st_size:
                    path.unlink()  # created by this attempt: an empty file would mislead
        else:
            log.error(
                "%s: %d MLflow records could not be saved anywhere (no space in %s or %s); "
                "every metric logged before the disk filled is in %s",
                why, count, self.run_dir, fallback.parent, self.run_dir / METRICS_FILE,
            )  # fmt: skip
            return
        move = f"move it to {self.run_dir / UNSENT_FILE} and " if path == fallback else ""
        log.warning(
            "%s: saved %d unsent MLflow records to %s (all metrics are also in %s). "
            "Send them later: %s%s %s",
            why,
            count,
            path,
            self.run_dir / METRICS_FILE,
            move,
            SYNC_COMMAND,
            self.run_dir,
        )

    def _serve(self) -> None:
        """The background thread: send queued operations in order until close()."""
        assert self.tracking_uri is not None
        sender = _Sender(self.tracking_uri, self.run_dir)
        failures = 0  # consecutive failures of the group at the head of the queue
        outage_since: float | None = None
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._ops or self._closing or self._abandoned)
                    if self._abandoned or not self._ops:
                        return
                    group = [self._ops[i] for i in range(_group_len(self._ops, 0))]
                try:
                    sent = sender.send(group)
                except Exception as e:  # classified below: retry, drop or stop
                    failures += 1
                    action = self._on_failure(e, group, failures, sender, outage_since)
                    if action == "stop":
                        return
                    if action == "retry":
                        outage_since = outage_since or time.monotonic()
                        self._backoff(failures)
                        continue
                    sent = 0  # "drop": give up on this group and go on
                if outage_since is not None:
                    log.info(
                        "MLflow at %s is reachable again after %.0f s; sending the backlog",
                        self.tracking_uri,
                        time.monotonic() - outage_since,
                    )
                    outage_since = None
                failures = 0
                with self._cond:
                    if self._abandoned:
                        return
                    for _ in group:
                        self._ops.popleft()
                    if group[0]["op"] == "start_run" and group[0].get("token") == self._token:
                        self._run_id = sender.run_id
                        self._start_system_metrics()
                    self._cond.notify_all()
                log.debug("MLflow: sent %s (%d records)", group[0]["op"], sent)
        except Exception:
            # Not expected (every send error is handled above). Log it with its traceback and
            # end the thread; close() then saves the queue instead of waiting for it.
            log.exception("MLflow tracking thread failed; records will be saved at close()")
        finally:
            with self._cond:
                self._worker_done = True
                self._cond.notify_all()

    def _on_failure(
        self,
        exc: Exception,
        group: list[Op],
        failures: int,
        sender: _Sender,
        outage_since: float | None,
    ) -> str:
        """Decide what a failed send means: "retry", "drop" (this group) or "stop" (all)."""
        kind = _classify(exc)
        op = group[0]["op"]
        if kind == _SERVER_ERROR and failures >= SERVER_ERROR_ATTEMPTS and sender.healthy():
            kind = _PERMANENT  # the server works but keeps failing on this record
        if kind == _PERMANENT and op == "start_run":
            kind = _FATAL  # without a run nothing else can be logged
        if kind == _FATAL:
            with self._cond:
                self._disabled = True
                self._cond.notify_all()
            log.error(
                "MLflow tracking is off for this job: %s. %s Training continues; metrics are in "
                "%s and unsent MLflow records are saved to %s at the end (send them with `%s %s`).",
                _describe(exc, 600),
                _uri_help(self.tracking_uri or ""),
                self.run_dir / METRICS_FILE,
                self.run_dir / UNSENT_FILE,
                SYNC_COMMAND,
                self.run_dir,
            )
            return "stop"
        if kind == _PERMANENT:
            log.warning(
                "MLflow rejected the %s operation: %s. Dropped it%s.",
                op,
                _describe(exc),
                "; the values remain in metrics.jsonl" if op == "metrics" else "",
            )
            return "drop"
        if outage_since is None:
            log.warning(
                "Cannot reach MLflow at %s (%s). Training continues; metrics are in %s and "
                "will be sent when the server is back (retrying every few seconds). %s",
                self.tracking_uri,
                _describe(_root_cause(exc)),
                self.run_dir / METRICS_FILE,
                _uri_help(self.tracking_uri or ""),
            )
        else:
            log.debug("MLflow still unreachable: %s", _describe(exc))
        return "retry"

    def _backoff(self, failures: int) -> None:
        """Wait before retrying (0.5 s doubling up to max_backoff_s); wakes early only when
        close() gives up, not on every new record."""
        delay = min(self.max_backoff_s, 0.5 * 2 ** (failures - 1))
        deadline = time.monotonic() + delay
        with self._cond:
            while not self._abandoned and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(timeout=left)


class NullTracker:
    """The tracker for ranks other than 0: same API, does nothing."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self, timeout_s: float) -> bool:
        return True

    def close(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Sending saved records later


def _read_ops(path: Path) -> list[Op]:
    ops: list[Op] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ops.append(json.loads(line))
            except ValueError as e:
                log.warning("%s:%d: skipping an unreadable line (%s)", path, lineno, e)
    return ops


def sync_unsent(run_dir: Path, tracking_uri: str | None = None) -> int:
    """Send the records in ``run_dir/mlflow_unsent.jsonl`` to MLflow; returns how many were
    sent (metric values, params, tags, artifacts).

    ``tracking_uri`` overrides the URI recorded with the records (e.g. to fix a wrong one).
    On success the file is renamed to ``mlflow_unsent.jsonl.sent``. Records MLflow rejects for
    good are logged and skipped. If the server cannot be reached, :class:`SyncError` is raised
    and the file is kept; sending again is safe (see the module docstring).
    """
    run_dir = Path(run_dir)
    path = run_dir / UNSENT_FILE
    if not path.exists():
        log.info("Nothing to send: %s does not exist", path)
        return 0
    ops = _read_ops(path)
    _HttpDefaults.acquire()
    try:
        sent = _send_all(ops, run_dir, tracking_uri, path)
    finally:
        _HttpDefaults.release()
    os.replace(path, path.with_name(path.name + ".sent"))
    log.info("Sent %d MLflow records from %s", sent, path)
    return sent


def _send_all(ops: list[Op], run_dir: Path, tracking_uri: str | None, path: Path) -> int:
    sender: _Sender | None = None
    sent = 0
    i = 0
    while i < len(ops):
        op = ops[i]
        if op["op"] == "start_run":
            uri = tracking_uri or op.get("tracking_uri") or resolve_tracking_uri(None, run_dir)
            if sender is None or sender.tracking_uri != uri:
                sender = _Sender(uri, run_dir)
        if sender is None:
            raise SyncError(f"{path} does not start with a start_run record; cannot send it")
        n = _group_len(ops, i)
        try:
            sent += sender.send(ops[i : i + n])
        except Exception as e:  # classified: a rejected record is skipped, anything else stops
            kind = _classify(e)
            if kind != _PERMANENT or op["op"] == "start_run":
                if kind in (_OUTAGE, _SERVER_ERROR):
                    detail = _describe(_root_cause(e))
                    hint = "Is the server up? Nothing was deleted; run the sync again."
                else:
                    detail = _describe(e)
                    hint = _uri_help(sender.tracking_uri)
                raise SyncError(
                    f"Could not send {path} to MLflow at {sender.tracking_uri}: {detail}. {hint}"
                ) from e
            log.warning("MLflow rejected the %s record: %s; skipped it", op["op"], _describe(e))
        i += n
    return sent
