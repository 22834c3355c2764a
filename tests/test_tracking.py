import json
import logging
import socket
import time
from pathlib import Path

import pytest

from lmu_asr.tracking import (
    SPOOL_NAME,
    JsonlSink,
    MlflowSink,
    Tracker,
    TrackingConfig,
    flatten_params,
    resolve_uri,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module: creating its tables takes a few seconds."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(scope="module")
def client(store):
    from mlflow import MlflowClient

    return MlflowClient(store)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config_validation_and_uri(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="tracking.experiment"):
        TrackingConfig(experiment="")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path}/rel.db"
    assert resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://h:1")
    assert resolve_uri(None) == "http://h:1"


def test_flatten_params():
    flat = flatten_params({"model": {"d": 64, "layers": [1, 2]}, "lr": 1e-3, "s": "x" * 7000})
    assert flat == {"model.d": "64", "model.layers": "[1, 2]", "lr": "0.001", "s": "x" * 6000}


def test_jsonl_lines_are_flushed_and_survive_a_half_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log({"loss": 1.5, "wer": float("nan")}, step=1)
    rows = _lines(path)  # readable while the sink is still open
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 1.5 and rows[0]["wer"] is None
    assert rows[0]["time"] == pytest.approx(time.time(), abs=60)
    with pytest.raises(ValueError, match="step"):
        sink.log({"step": 3.0}, step=2)
    sink.close()
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a job killed mid-write
    sink = JsonlSink(path)
    sink.log({"loss": 1.0}, step=2)
    sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["loss"] == 1.0


def test_params_metrics_and_artifact_reach_a_local_store(store, client, tmp_path):
    cfg = TrackingConfig(uri=store, experiment="basic")
    run_dir = tmp_path / "run-a"
    params = {"model": {"d": 64}, "lr": 1e-3}
    with Tracker(cfg, run_dir, rank=0, params=params) as tracker:
        tracker.log({"loss": 2.0}, step=1)
        tracker.log({"loss": 1.0, "wer": 0.5}, step=2)
        (tmp_path / "results.json").write_text("{}")
        tracker.log_artifact(tmp_path / "results.json")
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"model.d": "64", "lr": "0.001"}
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(run_dir.resolve())
    assert _history(client, tracker.run_id, "loss") == [(1, 2.0), (2, 1.0)]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["results.json"]
    assert [r["step"] for r in _lines(run_dir / "metrics.jsonl")] == [1, 2]


def test_requeued_job_continues_the_same_run(store, client, tmp_path, caplog):
    cfg = TrackingConfig(uri=store, experiment="resume")
    first = Tracker(cfg, tmp_path, rank=0, params={"lr": 0.1})
    first.log({"loss": 3.0}, step=1)
    first.close("KILLED")
    assert client.get_run(first.run_id).info.status == "KILLED"

    # a changed param would be refused by MLflow if it were logged again
    second = Tracker(cfg, tmp_path, rank=0, params={"lr": 0.2, "extra": 1}, run_id=first.run_id)
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.log({"loss": 2.0}, step=2)
    second.close()
    run = client.get_run(first.run_id)
    assert run.data.params == {"lr": "0.1", "extra": "1"} and run.info.status == "FINISHED"
    assert _history(client, first.run_id, "loss") == [(1, 3.0), (2, 2.0)]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert "rejected" not in caplog.text and "unreachable" not in caplog.text


def test_parent_run_id_tag(store, client, tmp_path):
    exp = client.get_experiment_by_name("basic") or client.create_experiment("basic")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    parent = client.create_run(exp_id, run_name="sweep").info.run_id
    cfg = TrackingConfig(uri=store, experiment="basic", parent_run_id=parent, run_name="trial-3")
    tracker = Tracker(cfg, tmp_path, rank=0, params={})
    tracker.close()
    run = client.get_run(tracker.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.run_name == "trial-3"


def test_other_ranks_and_disabled_mlflow(tmp_path):
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{_closed_port()}")
    other = Tracker(cfg, tmp_path / "r1", rank=1, params={"a": 1}, run_id="abc")
    other.log({"loss": 1.0}, step=1)
    other.log_artifact(tmp_path)
    other.close()
    assert other.run_id == "abc" and not (tmp_path / "r1").exists()

    off = Tracker(TrackingConfig(enabled=False), tmp_path / "r0", rank=0, params={})
    off.log({"loss": 1.0}, step=1)
    off.close()
    assert off.run_id is None and off.mlflow is None
    assert _lines(tmp_path / "r0" / "metrics.jsonl")[0]["loss"] == 1.0


def test_unreachable_server_spools_then_next_job_replays(store, client, tmp_path, caplog):
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lmu_asr.tracking"):
        tracker = Tracker(TrackingConfig(uri=uri), tmp_path, rank=0, params={"lr": 0.1})
        for step in (1, 2, 3):
            tracker.log({"loss": 1.0 / step}, step=step)
        tracker.log_artifact(tmp_path / "metrics.jsonl")
        tracker.close()
    assert time.monotonic() - start < 15  # a down server costs seconds, not minutes
    warnings = [r for r in caplog.records if "unreachable or failing" in r.getMessage()]
    assert len(warnings) == 1 and uri in warnings[0].getMessage()
    assert tracker.run_id is None
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    spooled = _lines(tmp_path / SPOOL_NAME)
    assert [e.get("step") for e in spooled] == [1, 2, 3, None]

    # the requeued job finds the store reachable: the spool is replayed into its run
    cfg = TrackingConfig(uri=store, experiment="replay")
    tracker = Tracker(cfg, tmp_path, rank=0, params={"lr": 0.1})
    tracker.log({"loss": 0.1}, step=4)
    tracker.close()
    assert not (tmp_path / SPOOL_NAME).exists()
    assert [s for s, _ in _history(client, tracker.run_id, "loss")] == [1, 2, 3, 4]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["metrics.jsonl"]


def _flaky(sink: MlflowSink, failures: int) -> list[int]:
    """Make the next `failures` log_batch calls fail as a dropped connection would."""
    real, calls = sink.client.log_batch, []

    def log_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) <= failures:
            raise ConnectionError("server went away")
        return real(*args, **kwargs)

    sink.client.log_batch = log_batch
    return calls


def test_server_back_mid_job_replays_in_order(store, client, tmp_path, caplog):
    cfg = TrackingConfig(uri=store, experiment="flaky")
    sink = MlflowSink(cfg, None, "flaky", {}, {}, spool_path=tmp_path / SPOOL_NAME, retry_s=0)
    _flaky(sink, failures=2)
    for step in (1, 2, 3):
        sink.log({"loss": float(step)}, step)
    assert not (tmp_path / SPOOL_NAME).exists()
    assert _history(client, sink.run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert caplog.text.count("unreachable or failing") == 1
    assert "reachable again" in caplog.text

    slow = MlflowSink(cfg, None, "backoff", {}, {}, spool_path=tmp_path / "s2.jsonl")
    calls = _flaky(slow, failures=1)
    for step in (1, 2, 3):
        slow.log({"loss": float(step)}, step)
    assert len(calls) == 1  # within the back-off nothing is sent, everything spooled
    assert [e["step"] for e in _lines(tmp_path / "s2.jsonl")] == [1, 2, 3]
    slow.close()  # close tries once more whatever the back-off
    assert _history(client, slow.run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert client.get_run(slow.run_id).info.status == "FINISHED"


def test_rejected_metrics_are_dropped_not_spooled(store, client, tmp_path, caplog):
    cfg = TrackingConfig(uri=store, experiment="rejected")
    sink = MlflowSink(cfg, None, "bad", {}, {}, spool_path=tmp_path / SPOOL_NAME)
    sink.log({"bad?name": 1.0}, 1)
    sink.log({"loss": 1.0}, 2)
    sink.close()
    assert "rejected metrics" in caplog.text and not (tmp_path / SPOOL_NAME).exists()
    assert _history(client, sink.run_id, "loss") == [(2, 1.0)]


def test_a_job_resumed_behind_its_last_logged_step_logs_each_step_once(store, client, tmp_path):
    """Killed at step 3 after a checkpoint at step 1: the resumed job replays steps 2-3. They
    reach neither metrics.jsonl nor MLflow again; a metric not yet logged at a step still is."""
    cfg = TrackingConfig(uri=store, experiment="replay")
    first = Tracker(cfg, tmp_path, rank=0, params={})
    for step in (1, 2, 3):
        first.log({"loss": 10.0 + step}, step)
    first.close("KILLED")

    second = Tracker(cfg, tmp_path, rank=0, params={}, run_id=first.run_id)
    for step in (2, 3, 4):
        second.log({"loss": 20.0 + step}, step)
    second.log({"dev/cer": 0.5}, 3)  # validation at step 3 never happened before the kill
    second.close()
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("loss"), r.get("dev/cer")) for r in rows] == [
        (1, 11.0, None), (2, 12.0, None), (3, 13.0, None), (4, 24.0, None), (3, None, 0.5)
    ]  # fmt: skip
    assert _history(client, first.run_id, "loss") == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0)]
    assert _history(client, first.run_id, "dev/cer") == [(3, 0.5)]
