"""Tests for trainer.tracking: local records, the embedded SQLite store, and a real MLflow
server that is unreachable at first or goes away mid-run.

Tests that run a real ``mlflow server`` use the ``mlflow_server`` fixture (grep for it); they
share one server per module, which each test stops and starts as it needs (a start takes
10-30 s here).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from patchsae.trainer.tracking import (
    CURSOR_FILE,
    METRICS_FILE,
    RUN_INFO_FILE,
    UNSENT_FILE,
    NullTracker,
    SyncError,
    Tracker,
    _classify,
    read_metrics,
    read_run_info,
    resolve_tracking_uri,
    sync_unsent,
)

from tests.helpers import free_port
from tests.mlflow_server import MlflowServer

LOGGER = "patchsae.trainer.tracking"


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One embedded store for the module: creating an MLflow database takes ~5 s."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, sqlite_uri: str
) -> Iterator[MlflowServer]:
    """A real MLflow server, *not started*: each test starts or stops it as it needs. It shares
    the module's store, so it need not create a second database."""
    server = MlflowServer(tmp_path_factory.mktemp("server"), backend_store_uri=sqlite_uri)
    try:
        yield server
    finally:
        server.stop()
        print(f"---- mlflow server log ({server.log_path}) ----\n{server.log_tail()}")


def make_tracker(run_dir: Path, uri: str | None, **kwargs) -> Tracker:
    kwargs.setdefault("experiment", "tests")
    return Tracker(run_dir, enabled=True, tracking_uri=uri, run_name=run_dir.name, **kwargs)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """The server's metric history as sorted (step, value); duplicates are kept."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ---- local records ------------------------------------------------------------------------


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://env:5000"
    assert resolve_tracking_uri("http://cfg:5000", tmp_path) == "http://cfg:5000"


def test_metrics_jsonl_without_mlflow(tmp_path: Path) -> None:
    with Tracker(tmp_path, enabled=False, tracking_uri=None, experiment="e", run_name="r") as t:
        t.log_metrics({"loss": 2.0, "l0": 10}, step=1)
        t.log_metrics({"loss": 1.0}, step=0)
        t.log_metrics({"loss": 0.5}, step=1)  # re-logged after a resume: the last one wins
        t.log_params({"a": 1})  # no MLflow: ignored
    # A line cut short by a crash is skipped, and the next job starts on a new line.
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 2, "metr')
    with Tracker(tmp_path, enabled=False, tracking_uri=None, experiment="e", run_name="r") as t:
        t.log_metrics({"loss": 0.25}, step=3)
    assert read_metrics(tmp_path) == {"loss": [(0, 1.0), (1, 0.5), (3, 0.25)], "l0": [(1, 10.0)]}
    first = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])
    assert first["step"] == 1 and first["metrics"] == {"loss": 2.0, "l0": 10.0}
    assert isinstance(first["timestamp"], int)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / RUN_INFO_FILE).exists()
    with pytest.raises(RuntimeError, match="closed"):
        t.log_metrics({"loss": 0.1}, step=3)

    null = NullTracker()
    null.log_metrics({"x": 1.0}, 0)
    null.close()
    assert null.run_id is None


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(response=response)


def _wrapped(cause: BaseException) -> MlflowException:
    """What MLflow's REST client raises for a network error: the cause is only chained."""
    try:
        raise cause
    except BaseException:
        try:
            raise MlflowException("API request to http://x failed with exception ...")
        except MlflowException as e:
            return e


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_wrapped(requests.ConnectionError("refused")), "outage"),
        (_wrapped(requests.Timeout("slow")), "outage"),
        (ConnectionRefusedError(), "outage"),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "m"}), "server-error"),
        (RestException({"error_code": "INTERNAL_ERROR", "message": "m"}), "server-error"),
        (_http_error(503), "server-error"),
        (RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "m"}), "permanent"),
        (MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST), "permanent"),
        (_http_error(400), "permanent"),
        (FileNotFoundError("report.txt"), "permanent"),
        (RestException({"error_code": "UNAUTHENTICATED", "message": "m"}), "fatal"),
        (_wrapped(requests.exceptions.InvalidURL("http://")), "fatal"),
        (RuntimeError("who knows"), "server-error"),
    ],
)
def test_error_classification(exc: BaseException, kind: str) -> None:
    assert _classify(exc) == kind


# ---- embedded SQLite store ------------------------------------------------------------------


def test_embedded_store_records_everything(
    tmp_path: Path, sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)  # tracking_uri=None falls back to it
    run_dir = tmp_path / "run"
    report = tmp_path / "report.txt"
    report.write_text("hello")
    params = {f"p{i}": i for i in range(150)} | {"long": "x" * 7000}  # > 100 per batch
    wide = {f"w{i}": float(i) for i in range(1500)}  # > 1000 in one call

    with make_tracker(run_dir, None, experiment="embedded") as tracker:
        tracker.log_params(params)
        for step in range(50):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "l0": float(step)}, step=step)
        tracker.log_metrics(wide, step=50)
        tracker.set_tags({"stage": "test"})
        tracker.log_artifact(report, "reports")
    run_id = tracker.run_id
    assert run_id is not None

    client = MlflowClient(sqlite_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert run.data.params["p149"] == "149"
    assert run.data.params["long"] == "x" * 6000  # MLflow's limit
    assert len(run.data.params) == 151
    assert run.data.tags["stage"] == "test"
    assert history(client, run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(50)]
    assert history(client, run_id, "l0") == [(s, float(s)) for s in range(50)]
    assert history(client, run_id, "w1499") == [(50, 1499.0)]
    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/report.txt"]
    # Artifacts of an embedded store live next to the database, not in the working directory.
    artifact_dir = Path(sqlite_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    assert list(artifact_dir.rglob("report.txt"))

    assert read_run_info(run_dir) == {
        "tracking_uri": sqlite_uri,
        "experiment": "embedded",
        "experiment_id": run.info.experiment_id,
        "run_id": run_id,
        "run_name": "run",
    }
    assert not (run_dir / UNSENT_FILE).exists()
    assert read_metrics(run_dir)["loss"] == history(client, run_id, "loss")


def test_resume_continues_the_same_run(
    tmp_path: Path, sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with make_tracker(tmp_path, sqlite_uri, experiment="resume") as first:
        first.log_params({"lr": 0.001, "total_tokens": 100})
        for step in range(10):
            first.log_metrics({"loss": float(step)}, step=step)

    info = read_run_info(tmp_path)
    assert info is not None and info["run_id"] == first.run_id
    with make_tracker(tmp_path, sqlite_uri, experiment="resume", run_id=info["run_id"]) as second:
        # Same value again: fine. A changed value is rejected by MLflow: logged and dropped.
        second.log_params({"lr": 0.001, "total_tokens": 200, "resumed": True})
        for step in range(10, 20):
            second.log_metrics({"loss": float(step)}, step=step)
        assert second.flush(30)
        assert second.run_id == first.run_id
        assert MlflowClient(sqlite_uri).get_run(first.run_id).info.status == "RUNNING"

    client = MlflowClient(sqlite_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert history(client, first.run_id, "loss") == [(s, float(s)) for s in range(20)]
    assert run.data.params == {"lr": "0.001", "total_tokens": "100", "resumed": "True"}
    assert len(messages(caplog, logging.WARNING, "total_tokens")) == 1
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_of_an_unknown_run_starts_a_new_one(
    tmp_path: Path, sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    missing = "0123456789abcdef0123456789abcdef"
    with make_tracker(tmp_path, sqlite_uri, experiment="resume", run_id=missing) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)
    assert tracker.run_id not in (None, missing)
    assert read_run_info(tmp_path)["run_id"] == tracker.run_id
    assert len(messages(caplog, logging.WARNING, f"{missing} does not exist")) == 1
    assert history(MlflowClient(sqlite_uri), tracker.run_id, "loss") == [(0, 1.0)]


def test_rejected_metric_is_dropped_alone(
    tmp_path: Path, sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    with make_tracker(tmp_path, sqlite_uri, experiment="rejected") as tracker:
        tracker.log_metrics({"loss": 1.0, "bad!key": 2.0}, step=0)
        tracker.log_metrics({"loss": 0.5}, step=1)
    client = MlflowClient(sqlite_uri)
    assert history(client, tracker.run_id, "loss") == [(0, 1.0), (1, 0.5)]
    assert "bad!key" not in client.get_run(tracker.run_id).data.metrics
    assert len(messages(caplog, logging.WARNING, "bad!key")) == 1
    assert read_metrics(tmp_path)["bad!key"] == [(0, 2.0)]  # still recorded locally


def test_unusable_uri_keeps_records_for_sync(
    tmp_path: Path, sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = "nosuchscheme://host/path"
    tracker = make_tracker(tmp_path, bad, experiment="bad-uri", flush_timeout_s=30)
    tracker.log_params({"a": 1})
    for step in range(5):
        tracker.log_metrics({"loss": float(step)}, step=step)
    start = time.perf_counter()
    tracker.close()
    assert time.perf_counter() - start < 5, "close() must not wait for a URI that cannot work"

    errors = messages(caplog, logging.ERROR, bad)
    assert len(errors) == 1 and "MLFLOW_TRACKING_URI" in errors[0]
    assert tracker.run_id is None
    assert read_metrics(tmp_path)["loss"] == [(s, float(s)) for s in range(5)]
    assert (tmp_path / UNSENT_FILE).exists()
    assert "patchsae sync-mlflow" in messages(caplog, logging.WARNING, UNSENT_FILE)[0]

    assert sync_unsent(tmp_path, tracking_uri=sqlite_uri) == 6  # 5 metric values + 1 param
    assert not (tmp_path / UNSENT_FILE).exists()
    run_id = read_run_info(tmp_path)["run_id"]
    client = MlflowClient(sqlite_uri)
    assert history(client, run_id, "loss") == [(s, float(s)) for s in range(5)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sync_unsent(tmp_path) == 0  # nothing left


def test_the_next_job_sends_what_an_earlier_job_left_unsent(
    tmp_path: Path, sqlite_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The outbox is the run directory: a job whose server never answered leaves its params,
    artifact and metrics there, and the next job on the directory sends them with its own,
    without a sync; the cursor then stands at the end of metrics.jsonl."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    report = tmp_path / "report.txt"
    report.write_text("hello")
    down = f"http://127.0.0.1:{free_port()}"
    with make_tracker(tmp_path, down, experiment="handover", flush_timeout_s=0.5) as first:
        first.log_params({"lr": 0.001})
        first.log_artifact(report)
        for step in range(5):
            first.log_metrics({"loss": float(step)}, step=step)
    assert first.run_id is None and (tmp_path / UNSENT_FILE).exists()

    with make_tracker(tmp_path, sqlite_uri, experiment="handover") as second:
        for step in range(5, 8):
            second.log_metrics({"loss": float(step)}, step=step)
    assert messages(caplog, logging.INFO, "an earlier job left unsent")
    client = MlflowClient(sqlite_uri)
    run = client.get_run(second.run_id)
    assert history(client, second.run_id, "loss") == [(s, float(s)) for s in range(8)]
    assert run.data.params == {"lr": "0.001"} and run.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(second.run_id)] == ["report.txt"]
    assert not (tmp_path / UNSENT_FILE).exists()
    cursor = json.loads((tmp_path / CURSOR_FILE).read_text())
    assert cursor["offset"] == (tmp_path / METRICS_FILE).stat().st_size
    assert cursor["run_id"] == second.run_id == read_run_info(tmp_path)["run_id"]


# ---- a real MLflow server (mlflow_server fixture) --------------------------------------------


def test_server_unreachable_from_start_then_sync(
    tmp_path: Path, mlflow_server: MlflowServer, caplog: pytest.LogCaptureFixture
) -> None:
    mlflow_server.stop()  # nothing listens on its port yet
    tracker = make_tracker(tmp_path, mlflow_server.uri, experiment="late", flush_timeout_s=1.0)
    tracker.log_params({"lr": 0.001})
    start = time.perf_counter()
    for step in range(200):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "l0": float(step)}, step=step)
    assert time.perf_counter() - start < 2.0, "log_metrics must not wait for the server"
    start = time.perf_counter()
    tracker.close()
    assert time.perf_counter() - start < 4.0

    assert tracker.run_id is None
    assert len(messages(caplog, logging.WARNING, "Cannot reach MLflow")) == 1
    assert (tmp_path / UNSENT_FILE).exists()
    assert len(read_metrics(tmp_path)["loss"]) == 200

    with pytest.raises(SyncError, match="Is the server up"):
        sync_unsent(tmp_path)  # still down: fails fast and keeps the file
    assert (tmp_path / UNSENT_FILE).exists()

    mlflow_server.start()
    assert sync_unsent(tmp_path) == 401  # 400 metric values + 1 param
    run_id = read_run_info(tmp_path)["run_id"]
    client = MlflowClient(mlflow_server.uri)
    assert history(client, run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(200)]
    assert history(client, run_id, "l0") == [(s, float(s)) for s in range(200)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.001"}
    assert not (tmp_path / UNSENT_FILE).exists()


def test_server_outage_mid_run(
    tmp_path: Path, mlflow_server: MlflowServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    mlflow_server.start()
    report = tmp_path / "report.txt"
    report.write_text("hello")
    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, mlflow_server.uri, experiment="outage", max_backoff_s=0.5)
    keys = ("loss", "l0")

    def log_steps(steps: range) -> None:
        for step in steps:
            tracker.log_metrics({k: step * 10.0 + i for i, k in enumerate(keys)}, step=step)

    tracker.log_params({"lr": 0.001})
    log_steps(range(0, 10))
    assert tracker.flush(30), mlflow_server.log_tail()

    mlflow_server.stop()
    start = time.perf_counter()
    log_steps(range(10, 20))
    tracker.log_artifact(report)
    assert time.perf_counter() - start < 1.0
    assert [s for s, _ in read_metrics(run_dir)["loss"]] == list(range(20))
    assert wait_for(lambda: messages(caplog, logging.WARNING, "Cannot reach MLflow"), 10)

    mlflow_server.start()
    log_steps(range(20, 30))
    tracker.close()

    assert not (run_dir / UNSENT_FILE).exists()
    assert len(messages(caplog, logging.WARNING, "Cannot reach MLflow")) == 1
    assert messages(caplog, logging.INFO, "reachable again")
    client = MlflowClient(mlflow_server.uri)
    for i, key in enumerate(keys):
        assert history(client, tracker.run_id, key) == [(s, s * 10.0 + i) for s in range(30)]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(tracker.run_id)] == ["report.txt"]


def test_system_metrics_reach_the_run_until_close(tmp_path: Path, sqlite_uri: str) -> None:
    """MLflow's system-metrics monitor runs on the tracker's run: CPU and memory samples are in
    the store (what the UI's System metrics tab shows), and none arrive after close()."""
    tracker = make_tracker(tmp_path / "run", sqlite_uri, system_metrics_every_s=0.2)
    for step in range(10):
        tracker.log_metrics({"loss": float(step)}, step)
        time.sleep(0.2)
    assert wait_for(lambda: tracker.run_id is not None, 30)
    run_id = tracker.run_id
    tracker.close()
    client = MlflowClient(tracking_uri=sqlite_uri)
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        values = history(client, run_id, key)
        assert values and all(v >= 0 for _, v in values), key
    count = len(history(client, run_id, "system/cpu_utilization_percentage"))
    time.sleep(0.6)
    assert len(history(client, run_id, "system/cpu_utilization_percentage")) == count
    assert client.get_run(run_id).info.status == "FINISHED"
