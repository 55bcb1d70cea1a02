"""Experiment tracking that never stops or stalls training and never loses a metric.

The run directory is the record; MLflow is a copy of it that one sender brings up to date.

* ``metrics.jsonl``: the outbox of metric values. :meth:`Tracker.log_metrics` appends a line
  on the calling thread and flushes it, so it survives the process dying::

      {"step": 120, "timestamp": 1732550000123, "metrics": {"loss": 0.41, "l0": 31.0}}

  The timestamp (ms) is the one MLflow gets. A value sent twice is then the same record, and
  MLflow's SQL stores keep one copy. :func:`read_metrics` reads the file back.
* ``mlflow_sent.json``: the sender's cursor, ``{"tracking_uri", "experiment", "run_name",
  "token", "run_id", "offset"}``. ``offset`` is the number of bytes of ``metrics.jsonl`` that
  MLflow has acknowledged; it advances only after a ``log_batch`` succeeds. ``token`` tags the
  run when it is created, so a creation retried after a crash finds that run rather than making
  a second one.
* ``mlflow_unsent.json``: the other records MLflow has not acknowledged, ``{"params", "tags",
  "artifacts": [[file, artifact_path], ...], "end": {"status", "timestamp"} | null}``. An
  artifact is the file itself in the run directory, read when it is uploaded. The file is
  removed once everything in it is sent, so if it is still there after a job, the MLflow run is
  incomplete.
* ``mlflow_run.json``: the run once it exists (:func:`read_run_info`). A resumed job passes its
  ``run_id`` to :class:`Tracker` to continue the same run.

The tracker's background thread and :func:`sync_unsent` (``patchsae sync-mlflow``) are the same
sender. It creates or continues the run, sends params and tags, follows ``metrics.jsonl`` from
the offset, uploads artifacts, and sets the end status once nothing else is left. While the
server is down the thread backs off and the training thread never waits. Whatever a job leaves
unsent stays in the run directory; the next job on that directory, or a sync, sends it. A record
that MLflow rejects for good (an invalid key, a changed param value) is logged and dropped on its
own, and the rest still goes through.

By default MLflow's HTTP client retries a request 7 times and waits up to 120 s for each. While
a tracker or a sync is active, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and
``MLFLOW_HTTP_REQUEST_TIMEOUT`` default to 0 and 20 s (in ``os.environ``, and only where the user
has not set them), because this module retries on its own schedule.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from patchsae.trainer.checkpoint import atomic_write, disk_full_error, exception_chain, is_disk_full

if TYPE_CHECKING:  # mlflow is imported lazily: importing it takes seconds
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURSOR_FILE = "mlflow_sent.json"
UNSENT_FILE = "mlflow_unsent.json"
RUN_INFO_FILE = "mlflow_run.json"
SYNC_COMMAND = "patchsae sync-mlflow"
TOKEN_TAG = "patchsae.tracker_token"
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
SERVER_ERROR_ATTEMPTS = 3  # a 5xx this often while the server answers otherwise: a bad record
VALUES_PER_SEND = 5000  # metric values per log_batch call (MLflow splits it to its limits)

# What a failed send means: retry later, retry then drop, drop this record, or stop sending.
_OUTAGE, _SERVER_ERROR, _PERMANENT, _FATAL = "outage", "server-error", "permanent", "fatal"


class MlflowConfigError(RuntimeError):
    """MLflow cannot be used with this tracking URI; retrying will not help."""


class SyncError(RuntimeError):
    """:func:`sync_unsent` could not send the records; nothing was deleted."""


def resolve_tracking_uri(configured: str | None, run_dir: Path) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run_dir>/mlflow.db``."""
    if configured:
        return configured
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def _metric_lines(path: Path, offset: int = 0, warn: bool = True) -> Iterator[tuple[int, dict]]:
    """``(offset after it, record)`` for each complete line from ``offset``. A line that cannot be
    parsed (a write that a crash cut short) is skipped."""
    with path.open("rb") as f:
        f.seek(offset)
        for raw in f:
            if not raw.endswith(b"\n"):
                return  # being written, or cut short and not yet followed by a new line
            offset += len(raw)
            try:
                r = json.loads(raw)
                metrics = {str(k): float(v) for k, v in r["metrics"].items()}
                record = {
                    "step": int(r["step"]),
                    "timestamp": int(r["timestamp"]),
                    "metrics": metrics,
                }
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                if warn and raw.strip():
                    log.warning("%s at byte %d: skipping an unreadable line (%s)", path, offset, e)
                continue
            yield offset, record


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.jsonl`` as ``{key: [(step, value), ...]}`` sorted by step. If a step was logged
    more than once (a resumed job logs the steps after its checkpoint again), the last wins."""
    path, by_key = Path(run_dir) / METRICS_FILE, dict[str, dict[int, float]]()
    for _, record in _metric_lines(path) if path.exists() else ():
        for key, value in record["metrics"].items():
            by_key.setdefault(key, {})[record["step"]] = value
    return {key: sorted(steps.items()) for key, steps in by_key.items()}


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    """``mlflow_run.json`` (tracking_uri, experiment, experiment_id, run_id, run_name), or None
    while no MLflow run exists for this run directory."""
    return _read_json(Path(run_dir) / RUN_INFO_FILE)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(value, indent=1) + "\n"), path.name)


def _open_for_append(path: Path) -> IO[bytes]:
    """Open a JSON-lines file to append to, unbuffered. If a crash cut its last line short, start
    on a new line so that the next record is not glued to the broken one."""
    f = path.open("ab", buffering=0)
    if f.tell() > 0:
        with path.open("rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                _append_line(f, "", path)
    return f


def _append_line(f: IO[bytes], line: str, path: Path) -> None:
    """Append ``line`` and a newline, or nothing at all: a failed write is cut off again, so the
    file stays one record per line. A full disk raises ``DiskFullError``."""
    size, data = os.fstat(f.fileno()).st_size, memoryview((line + "\n").encode("utf-8"))
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


class _HttpDefaults:
    """Who applied :data:`HTTP_DEFAULTS` (see :func:`_http_defaults`)."""

    lock = threading.Lock()
    users = 0
    applied: dict[str, str] = {}


@contextmanager
def _http_defaults() -> Iterator[None]:
    """:data:`HTTP_DEFAULTS` in ``os.environ`` while any tracker or sync is active."""
    state = _HttpDefaults
    with state.lock:
        if state.users == 0:
            state.applied = {k: v for k, v in HTTP_DEFAULTS.items() if k not in os.environ}
            os.environ.update(state.applied)
        state.users += 1
    try:
        yield
    finally:
        with state.lock:
            state.users -= 1
            for name, value in state.applied.items() if state.users == 0 else ():
                if os.environ.get(name) == value:  # unless someone changed it meanwhile
                    del os.environ[name]


def _classify_status(status: int) -> str:
    if status in (401, 403):
        return _FATAL  # credentials: every request will fail the same way
    if status in (408, 429) or status >= 500:
        return _SERVER_ERROR
    return _PERMANENT if 400 <= status < 500 else _SERVER_ERROR


def _classify(exc: BaseException) -> str:
    """How to handle an exception raised while sending."""
    import requests
    import urllib3
    from mlflow.exceptions import MlflowException

    bad_url = (
        requests.exceptions.InvalidURL,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
    )
    network = (
        requests.RequestException,
        urllib3.exceptions.HTTPError,
        ConnectionError,
        TimeoutError,
        socket.gaierror,
    )
    if is_disk_full(exc):
        return _OUTAGE  # a full disk under a local store: retry once there is space
    for e in exception_chain(exc):  # MLflow wraps network errors, keeping them as the cause
        if isinstance(e, (MlflowConfigError, *bad_url)):
            return _FATAL
        if isinstance(e, requests.HTTPError) and e.response is not None:
            return _classify_status(e.response.status_code)  # e.g. an artifact upload
        if isinstance(e, network):
            return _OUTAGE
    if isinstance(exc, MlflowException):
        return _classify_status(exc.get_http_status_code())
    if isinstance(exc, (OSError, ValueError, TypeError)):
        return _PERMANENT  # a local file that is gone or unreadable, a value MLflow refuses
    return _SERVER_ERROR


def _describe(exc: BaseException, root: bool = False) -> str:
    """One line about ``exc`` (``root``: about the innermost error of its chain)."""
    exc = list(exception_chain(exc))[-1] if root else exc
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip().rstrip(".")
    return text if len(text) <= 300 else text[:297] + "..."


def _uri_help(uri: str) -> str:
    return (
        f"Check the tracking URI {uri!r}: set tracking.tracking_uri in the config or "
        "MLFLOW_TRACKING_URI (e.g. http://HOST:5000, or sqlite:///PATH/mlflow.db)."
    )


class _Outbox:
    """What of a run directory MLflow has not acknowledged (see the module docstring). Shared by
    the training thread, which adds, and the sender, which acknowledges; each change is saved."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.lock = Path(run_dir), threading.Lock()
        self.metrics_path = self.run_dir / METRICS_FILE
        self.cursor: dict[str, Any] = _read_json(self.run_dir / CURSOR_FILE) or {"offset": 0}
        self.unsent: dict[str, Any] = {"params": {}, "tags": {}, "artifacts": [], "end": None}
        self.unsent.update(_read_json(self.run_dir / UNSENT_FILE) or {})

    def aim(self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None) -> None:
        """Send to ``tracking_uri``. A server other than the cursor's gets a new run there with
        the whole metrics history."""
        old = self.cursor
        if old.get("tracking_uri") not in (None, tracking_uri):
            if old.get("run_id"):
                log.warning(
                    "%s was sent to %s (run %s); sending all of it to %s",
                    self.run_dir,
                    old["tracking_uri"],
                    old["run_id"],
                    tracking_uri,
                )
            old, run_id = {"offset": 0}, None
        new = {"token": uuid.uuid4().hex, **old, "tracking_uri": tracking_uri}
        new |= {
            "experiment": experiment,
            "run_name": run_name,
            "run_id": run_id or old.get("run_id"),
        }
        self.change(lambda: self.cursor.update(new), "cursor")

    def change(self, edit: Callable[[], Any], what: str = "unsent") -> None:
        """Apply ``edit`` to the ``cursor`` or the ``unsent`` records, and save that file."""
        with self.lock:
            edit()
            if what == "cursor":
                _write_json(self.run_dir / CURSOR_FILE, self.cursor)
            elif any(self.unsent.values()):
                _write_json(self.run_dir / UNSENT_FILE, self.unsent)
            else:
                (self.run_dir / UNSENT_FILE).unlink(missing_ok=True)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the unsent records, to send while the training thread adds more."""
        with self.lock:
            return json.loads(json.dumps(self.unsent))

    def metrics(self) -> tuple[list[Any], int]:
        """The metric values after the offset, up to :data:`VALUES_PER_SEND` of them (as MLflow
        ``Metric``s), and the offset after them."""
        from mlflow.entities import Metric

        values, offset = [], self.cursor["offset"]
        lines = _metric_lines(self.metrics_path, offset) if self.metrics_path.exists() else ()
        for end, r in lines:
            values += [Metric(k, v, r["timestamp"], r["step"]) for k, v in r["metrics"].items()]
            offset = end
            if len(values) >= VALUES_PER_SEND:
                break
        return values, offset

    def backlog(self) -> int:
        """How many records are not acknowledged: metric values, params, tags, artifacts."""
        u = self.unsent
        n = len(u["params"]) + len(u["tags"]) + len(u["artifacts"])
        if self.metrics_path.exists():
            lines = _metric_lines(self.metrics_path, self.cursor["offset"], warn=False)
            n += sum(len(r["metrics"]) for _, r in lines)
        return n

    def empty(self) -> bool:
        size = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        return not any(self.unsent.values()) and self.cursor["offset"] >= size


@dataclass
class _Unit:
    """One request's worth of the outbox: ``send`` returns the records MLflow accepted, then
    ``done`` takes them out of the outbox (also when they are dropped)."""

    kind: str
    send: Callable[[], int]
    done: Callable[[], None]


class _Sender:
    """Brings one tracking URI up to date with an outbox, a unit at a time."""

    def __init__(self, outbox: _Outbox) -> None:
        self.box, self.uri = outbox, outbox.cursor["tracking_uri"]
        self.run_id: str | None = None
        self._client: MlflowClient | None = None

    @property
    def run(self) -> str:
        """The run id, for the units that come after ``start_run``."""
        assert self.run_id is not None, "no MLflow run yet"
        return self.run_id

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            try:
                self._client = MlflowClient(tracking_uri=self.uri)
            except Exception as e:  # whatever the store registry raises: the URI is unusable
                detail = _describe(e)
                if type(e).__name__.startswith("Unsupported"):  # MLflow's text names the registry
                    detail = f"MLflow does not support the scheme {self.uri.partition(':')[0]!r}"
                raise MlflowConfigError(
                    f"MLflow cannot use tracking URI {self.uri!r}: {detail}"
                ) from e
        return self._client

    def healthy(self) -> bool:
        """Whether the server answers a simple request (tells a bad record from an outage)."""
        try:
            self.client.search_experiments(max_results=1)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not healthy"
            return False

    def next_unit(self) -> _Unit | None:
        """What to send next; None when MLflow holds the whole outbox."""
        from mlflow.entities import Param, RunTag

        box, u, todo = self.box, self.box.unsent, self.box.snapshot()
        if self.run_id is None:
            return _Unit("start_run", self._start_run, lambda: None)
        if todo["params"] or todo["tags"]:
            params, tags = todo["params"], todo["tags"]
            items = [Param(k, v) for k, v in params.items()] + [
                RunTag(k, v) for k, v in tags.items()
            ]

            def forget() -> None:
                for kind, sent in (("params", params), ("tags", tags)):
                    for k, v in sent.items():
                        if u[kind].get(k) == v:  # not changed meanwhile
                            del u[kind][k]

            return _Unit(
                "params",
                lambda: self._log_batch(items, "params and tags"),
                lambda: box.change(forget),
            )
        metrics, offset = box.metrics()
        if offset != box.cursor["offset"]:  # values, or only unreadable lines to step over
            return _Unit(
                "metrics",
                lambda: self._log_batch(metrics, "metrics"),
                lambda: box.change(lambda: box.cursor.update(offset=offset), "cursor"),
            )
        if todo["artifacts"]:
            art = todo["artifacts"][0]
            return _Unit(
                "artifact",
                lambda: self._upload(*art),
                lambda: box.change(lambda: u["artifacts"].remove(art)),
            )
        if end := todo["end"]:
            return _Unit(
                "end_run",
                lambda: self._end_run(end),
                lambda: box.change(lambda: u.update(end=None)),
            )
        return None

    def _upload(self, path: str, artifact_path: str | None) -> int:
        self.client.log_artifact(self.run, path, artifact_path)
        return 1

    def _end_run(self, end: dict[str, Any]) -> int:
        if end["status"] != "RUNNING":  # RUNNING: interrupted, to be resumed; leave it open
            self.client.set_terminated(self.run, end["status"], end_time=end["timestamp"])
        return 0

    def _log_batch(self, items: list[Any], what: str) -> int:
        """Send ``items``. If MLflow rejects them for good, bisect to drop only the bad records
        (one bad metric name must not cost a thousand good values)."""
        from mlflow.entities import Metric, Param, RunTag

        rejected: list[tuple[Any, BaseException]] = []

        def send(part: list[Any]) -> int:
            try:
                self.client.log_batch(
                    self.run,
                    metrics=[i for i in part if isinstance(i, Metric)],
                    params=[i for i in part if isinstance(i, Param)],
                    tags=[i for i in part if isinstance(i, RunTag)],
                )
                return len(part)
            except Exception as e:  # classified: only a permanent rejection is handled here
                if _classify(e) != _PERMANENT:
                    raise
                if len(part) == 1:
                    rejected.append((part[0], e))
                    return 0
            return send(part[: len(part) // 2]) + send(part[len(part) // 2 :])

        sent = send(items) if items else 0
        if rejected:
            log.warning(
                "MLflow rejected %d of %d %s (keys: %s): %s. Dropped them%s.",
                len(rejected),
                len(items),
                what,
                ", ".join(sorted({i.key for i, _ in rejected})),
                _describe(rejected[0][1]),
                "; they remain in metrics.jsonl" if what == "metrics" else "",
            )
        return sent

    def _start_run(self) -> int:
        """Find or create the experiment, then continue the cursor's run or create one."""
        from mlflow.exceptions import MlflowException

        client, cursor = self.client, self.box.cursor
        name = cursor["experiment"]
        experiment = client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage != "active":
            raise MlflowConfigError(
                f"MLflow experiment {name!r} is deleted in {self.uri!r}; restore it "
                "(`mlflow experiments restore`) or set tracking.experiment to another name."
            )
        if experiment is None:
            where = None  # a SQLite store keeps artifacts beside it, not in ./mlruns
            if self.uri.startswith("sqlite:///"):
                db = Path(self.uri.removeprefix("sqlite:///").split("?", 1)[0])
                where = (db.resolve().parent / "mlartifacts").as_uri()
            try:
                client.create_experiment(name, artifact_location=where)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":  # else another process won the race
                    raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None, name
        run_id = self._continue_run(cursor["run_id"]) if cursor["run_id"] else None
        token = cursor["token"]
        if run_id is None:  # an earlier attempt may have created it and then failed
            found = client.search_runs(
                [experiment.experiment_id], f"tags.`{TOKEN_TAG}` = '{token}'"
            )
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            run_id = client.create_run(
                experiment.experiment_id, tags={TOKEN_TAG: token}, run_name=cursor["run_name"]
            ).info.run_id
            log.info("MLflow run %s created in experiment %r at %s", run_id, name, self.uri)
        offset = cursor["offset"] if run_id == cursor["run_id"] else 0  # a new run gets it all
        self.box.change(lambda: cursor.update(run_id=run_id, offset=offset), "cursor")
        _write_json(
            self.box.run_dir / RUN_INFO_FILE,
            {
                "tracking_uri": self.uri,
                "experiment": name,
                "experiment_id": experiment.experiment_id,
                "run_id": run_id,
                "run_name": cursor["run_name"],
            },
        )
        self.run_id = run_id
        return 0

    def _continue_run(self, run_id: str) -> str | None:
        """Reopen an existing run on resume; None if it cannot be continued."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s does not exist at %s; starting a new run", run_id, self.uri)
            return None
        if run.info.lifecycle_stage != "active":
            log.warning("MLflow run %s is deleted; starting a new run", run_id)
            return None
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        log.info("Continuing MLflow run %s at %s", run_id, self.uri)
        return run_id


def _decide(exc: Exception, unit: _Unit, failures: int, sender: _Sender) -> str:
    """What a failed send means: ``_OUTAGE``/``_SERVER_ERROR`` (retry), ``_PERMANENT`` (drop
    this unit) or ``_FATAL`` (stop sending)."""
    how = _classify(exc)
    if how == _SERVER_ERROR and failures >= SERVER_ERROR_ATTEMPTS and sender.healthy():
        how = _PERMANENT  # the server works but keeps failing on this record
    return _FATAL if how == _PERMANENT and unit.kind == "start_run" else how


class Tracker:
    """Logs to the run directory at once and to MLflow from a background thread (rank 0 only).

    Args:
        run_dir: The run directory (created if missing).
        enabled: Log to MLflow. If False, only ``metrics.jsonl`` is written.
        tracking_uri: See :func:`resolve_tracking_uri`.
        experiment: MLflow experiment name (created if missing).
        run_name: MLflow run name, used when a new run is created.
        run_id: Continue this MLflow run (on resume; see :func:`read_run_info`). If it does not
            exist in the store, a new run is created and gets the whole history.
        flush_timeout_s: How long :meth:`close` waits for the backlog.
        max_backoff_s: Cap on the wait between retries while the server is unreachable.
        system_metrics_every_s: Once the run exists, MLflow's system-metrics monitor samples CPU,
            memory, disk, network (and NVIDIA GPUs) this often as ``system/*`` metrics until
            :meth:`close`; 0: off. These samples are MLflow's, not part of the outbox.

    Values are converted with ``float``/``str`` on the calling thread, so one that is not a
    number raises there. Nothing else raises but a full disk: the backlog of an outage is read
    from the run directory, so it costs neither memory nor data.
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
        self.flush_timeout_s, self.max_backoff_s = flush_timeout_s, max_backoff_s
        self.tracking_uri = resolve_tracking_uri(tracking_uri, self.run_dir) if enabled else None
        self._file = _open_for_append(self.run_dir / METRICS_FILE)
        self._cond = threading.Condition()  # guards the flags; notified whenever a unit is done
        self._wake = threading.Event()  # set when there is something new to send
        self._closed = self._stopping = self._disabled = self._worker_done = False
        self._run_id: str | None = None
        self._system_every_s = system_metrics_every_s
        self._monitor: Any = None
        self._thread: threading.Thread | None = None
        if self.tracking_uri is None:
            return
        self._box = _Outbox(self.run_dir)
        self._box.unsent["end"] = None  # an earlier job's end status: this job's decides
        self._box.aim(self.tracking_uri, experiment, run_name, run_id)
        if backlog := self._box.backlog():
            log.info("%d MLflow records an earlier job left unsent go out with this job's", backlog)
        self._http = ExitStack()
        self._http.enter_context(_http_defaults())
        self._thread = threading.Thread(target=self._serve, name="patchsae-mlflow", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once the run exists on the server, else None."""
        return self._run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters (values converted with ``str``; MLflow cuts them to its limit)."""
        self._add(lambda u: u["params"].update({str(k): str(v) for k, v in params.items()}))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags (values converted with ``str``; MLflow cuts them to its limit)."""
        self._add(lambda u: u["tags"].update({str(k): str(v) for k, v in tags.items()}))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file. It is read when the upload happens, so keep it in place."""
        if not Path(path).is_file():
            log.warning("Not logging %s to MLflow: it is not a file", path)
            return
        self._add(lambda u: u["artifacts"].append([str(Path(path).resolve()), artifact_path]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append the metrics to ``metrics.jsonl`` (flushed); the sender picks them up."""
        record = {
            "step": int(step),
            "timestamp": _now_ms(),
            "metrics": {str(k): float(v) for k, v in metrics.items()},
        }
        with self._cond:
            self._check_open()
            _append_line(self._file, json.dumps(record), self.run_dir / METRICS_FILE)
        self._wake.set()

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until everything logged so far was sent (or dropped); returns
        whether it was. The training loop has no need to call this."""
        if self._thread is None:
            return True
        with self._cond:
            self._cond.wait_for(self._idle, timeout=timeout_s)
            return self._box.empty()

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with ``status`` (FINISHED, FAILED, KILLED; RUNNING leaves it open
        for a job that will resume), waiting up to ``flush_timeout_s`` for the backlog."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._file.close()
        if self._thread is None:
            return
        if self._monitor is not None:  # its last samples go out before the run ends
            self._monitor.finish()
        end, saved = {"status": status, "timestamp": _now_ms()}, True
        try:
            self._box.change(lambda: self._box.unsent.update(end=end))
        except OSError as err:  # a full disk: the sender may still get it to MLflow
            saved = False
            log.warning("could not save unsent MLflow records to %s: %s", self.run_dir, err)
        self._wake.set()
        try:
            with self._cond:
                if not self._cond.wait_for(self._idle, timeout=self.flush_timeout_s):
                    log.info("Waited %.0f s for MLflow; giving up", self.flush_timeout_s)
                self._stopping = True
                self._cond.notify_all()
        finally:  # even when interrupted (Ctrl-C) while waiting
            self._wake.set()
            self._thread.join(timeout=1.0)
            self._http.close()
            self._report(saved)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.close("FINISHED" if exc_type is None else "KILLED" if interrupted else "FAILED")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Tracker for {self.run_dir} is closed")

    def _add(self, edit: Callable[[dict[str, Any]], Any]) -> None:
        self._check_open()
        if self._thread is not None:  # MLflow off: nothing but metrics.jsonl is kept
            self._box.change(lambda: edit(self._box.unsent))
            self._wake.set()

    def _idle(self) -> bool:
        return self._disabled or self._worker_done or self._box.empty()

    def _report(self, saved: bool) -> None:
        """Say what is left unsent at close, where it is, and how to send it."""
        if self._box.empty():
            log.info("MLflow: all records sent to %s (run %s)", self.tracking_uri, self._run_id)
            return
        why = (
            f"MLflow could not be used with {self.tracking_uri!r}"
            if self._disabled
            else "The MLflow thread stopped (see the error above)"
            if self._worker_done
            else f"The MLflow server at {self.tracking_uri} could not be reached"
        )
        path, move = self.run_dir / UNSENT_FILE, ""
        if not saved:  # the run directory is full: the unsent records go to the temp folder
            path = Path(tempfile.gettempdir()) / f"{UNSENT_FILE}.{self._box.cursor['token']}"
            move = f"move it to {self.run_dir / UNSENT_FILE} and "
            try:
                _write_json(path, self._box.unsent)
            except OSError as err:
                log.error("%s, and its end status could not be saved anywhere: %s", why, err)
                return
        log.warning(
            "%s: saved %d unsent MLflow records to %s (all metrics are in %s). Send them "
            "later: %s%s %s",
            why,
            self._box.backlog(),
            path,
            self.run_dir / METRICS_FILE,
            move,
            SYNC_COMMAND,
            self.run_dir,
        )

    def _start_system_metrics(self) -> None:
        if self._system_every_s <= 0 or self._closed:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self._run_id,
                sampling_interval=self._system_every_s,
                samples_before_logging=1,
                resume_logging=True,
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - system metrics are a nicety, never a failure
            log.warning("MLflow system metrics are off: %s", _describe(e))
            self._monitor = None

    def _serve(self) -> None:
        """The background thread: bring MLflow up to date with the outbox until close()."""
        sender, failures, outage_since = _Sender(self._box), 0, None
        try:
            while not self._stopping:
                self._wake.clear()
                if (unit := sender.next_unit()) is None:
                    with self._cond:
                        self._cond.notify_all()
                    self._wake.wait(timeout=1.0)
                    continue
                try:
                    sent = unit.send()
                except Exception as e:  # decided below: retry, drop or stop
                    failures += 1
                    how = _decide(e, unit, failures, sender)
                    if how == _FATAL:
                        return self._stop_sending(e)
                    if how != _PERMANENT:
                        if outage_since is None:
                            log.warning(
                                "Cannot reach MLflow at %s (%s). Training continues; metrics are in %s and "
                                "will be sent when the server is back (retrying every few seconds). %s",
                                self.tracking_uri,
                                _describe(e, root=True),
                                self.run_dir / METRICS_FILE,
                                _uri_help(self.tracking_uri or ""),
                            )
                        outage_since = outage_since or time.monotonic()
                        with self._cond:  # 0.5 s doubling up to max_backoff_s, or until close()
                            delay = min(self.max_backoff_s, 0.5 * 2 ** (failures - 1))
                            self._cond.wait_for(lambda: self._stopping, timeout=delay)
                        continue
                    sent = 0
                    log.warning(
                        "MLflow rejected the %s: %s. Dropped it%s.",
                        unit.kind,
                        _describe(e),
                        "; the values remain in metrics.jsonl" if unit.kind == "metrics" else "",
                    )
                if outage_since is not None:
                    log.info(
                        "MLflow at %s is reachable again after %.0f s; sending the backlog",
                        self.tracking_uri,
                        time.monotonic() - outage_since,
                    )
                failures, outage_since = 0, None
                unit.done()
                with self._cond:
                    if unit.kind == "start_run":
                        self._run_id = sender.run_id
                        self._start_system_metrics()
                    self._cond.notify_all()
                log.debug("MLflow: sent %s (%d records)", unit.kind, sent)
        except Exception:  # not expected: every send error is handled above
            log.exception("MLflow tracking thread failed; the records stay in %s", self.run_dir)
        finally:
            with self._cond:
                self._worker_done = True
                self._cond.notify_all()

    def _stop_sending(self, exc: Exception) -> None:
        with self._cond:
            self._disabled = True
        log.error(
            "MLflow tracking is off for this job: %s. %s Training continues; metrics are in "
            "%s and the other unsent records in %s (send them with `%s %s`).",
            _describe(exc),
            _uri_help(self.tracking_uri or ""),
            self.run_dir / METRICS_FILE,
            self.run_dir / UNSENT_FILE,
            SYNC_COMMAND,
            self.run_dir,
        )


class NullTracker:
    """The tracker for ranks other than 0: same API, does nothing."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...
    def __exit__(self, *exc_info: object) -> None: ...

    def flush(self, timeout_s: float) -> bool:
        return True

    def __enter__(self) -> NullTracker:
        return self


def sync_unsent(run_dir: Path, tracking_uri: str | None = None) -> int:
    """Send what MLflow does not hold yet of ``run_dir``: the tracker's sender, run to the end of
    the outbox. Returns the number of records sent (metric values, params, tags, artifacts).

    ``tracking_uri`` overrides the URI on record (a different server gets a new run with all of
    it). Records MLflow rejects for good are logged and skipped. If the server cannot be reached,
    :class:`SyncError` is raised; nothing is deleted and sending again is safe.
    """
    box, info = _Outbox(Path(run_dir)), read_run_info(run_dir) or {}
    known = {**info, **box.cursor}
    uri = tracking_uri or known.get("tracking_uri") or resolve_tracking_uri(None, box.run_dir)
    box.aim(
        uri,
        known.get("experiment") or "patchsae",
        known.get("run_name") or box.run_dir.resolve().name,
        known.get("run_id"),
    )
    sender, sent = _Sender(box), 0
    with _http_defaults():
        while unit := None if box.empty() and sender.run_id is None else sender.next_unit():
            try:
                sent += unit.send()
            except Exception as e:  # decided: a rejected record is skipped, anything else stops
                how = _decide(e, unit, SERVER_ERROR_ATTEMPTS, sender)
                if how != _PERMANENT:
                    hint = (
                        _uri_help(uri)
                        if how == _FATAL
                        else "Is the server up? Nothing was deleted; run the sync again."
                    )
                    raise SyncError(
                        f"Could not send {box.run_dir} to MLflow at {uri}: "
                        f"{_describe(e, root=how != _FATAL)}. {hint}"
                    ) from e
                log.warning("MLflow rejected the %s: %s; skipped it", unit.kind, _describe(e))
            unit.done()
    log.info("Sent %d MLflow records from %s", sent, box.run_dir)
    return sent
