import json
import logging
import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lmu_asr.mlflow_mirror import STATE_NAME, MlflowMirror, experiment_id, read_state
from lmu_asr.parent_run import JOBS_TAG
from lmu_asr.tracking import JsonlSink, Tracker, TrackingConfig, flatten_params, resolve_uri
from lmu_asr.tracking import main as tracking_main


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


def _history_equals_jsonl(client, run_id: str, run_dir: Path) -> None:
    """MLflow holds exactly metrics.jsonl: every (metric, step, value, time), once."""
    want = sorted(
        (k, r["step"], v, int(r["time"] * 1000))
        for r in _lines(run_dir / "metrics.jsonl")
        for k, v in r.items()
        if k not in ("step", "time")
    )
    keys = {k for k, *_ in want}
    got = sorted(
        (k, m.step, m.value, m.timestamp)
        for k in keys
        for m in client.get_metric_history(run_id, k)
    )
    assert got == want


def test_params_metrics_tags_and_artifact_reach_a_local_store(store, client, tmp_path):
    cfg = TrackingConfig(uri=store, experiment="basic")
    run_dir = tmp_path / "run-a"
    params = {"model": {"d": 64}, "lr": 1e-3}
    with Tracker(cfg, run_dir, rank=0, params=params, world_size=2) as tracker:
        tracker.log({"loss": 2.0}, step=1)
        tracker.log({"loss": 1.0, "wer": 0.5}, step=2)
        (tmp_path / "results.json").write_text("{}")
        tracker.log_artifact(tmp_path / "results.json")
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"model.d": "64", "lr": "0.001"}
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["run_dir"] == str(run_dir.resolve()) and tags["world_size"] == "2"
    assert len(tags["config_hash"]) == 12 and len(tags["git_commit"].split("-")[0]) == 40
    assert _history(client, tracker.run_id, "loss") == [(1, 2.0), (2, 1.0)]
    _history_equals_jsonl(client, tracker.run_id, run_dir)
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["results.json"]
    state = read_state(run_dir)
    assert state["run_id"] == tracker.run_id and state["uri"] == store and state["url"] is None
    assert state["offset"] == (run_dir / "metrics.jsonl").stat().st_size


def test_requeued_job_continues_the_same_run(store, client, tmp_path, caplog):
    """A job stopped to be requeued leaves its run RUNNING; the next job finds it in
    tracking.json and continues it (params already logged are left alone)."""
    cfg = TrackingConfig(uri=store, experiment="resume")
    first = Tracker(cfg, tmp_path, rank=0, params={"lr": 0.1})
    first.log({"loss": 3.0}, step=1)
    first.close(None)
    assert client.get_run(first.run_id).info.status == "RUNNING"

    # a changed param would be refused by MLflow if it were logged again
    second = Tracker(cfg, tmp_path, rank=0, params={"lr": 0.2, "extra": 1})
    second.log({"loss": 2.0}, step=2)
    second.close("KILLED")
    assert second.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.data.params == {"lr": "0.1", "extra": "1"} and run.info.status == "KILLED"
    assert _history(client, first.run_id, "loss") == [(1, 3.0), (2, 2.0)]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert "rejected" not in caplog.text and "unreachable" not in caplog.text


def test_children_in_the_parents_experiment_and_the_parent_follows_them(store, client, tmp_path):
    exp = experiment_id(client, store, "sweeps")
    parent = client.create_run(exp, run_name="sweep", tags={JOBS_TAG: "2"}).info.run_id
    cfg = TrackingConfig(uri=store, experiment="elsewhere", parent_run_id=parent, run_name="t-3")
    a = Tracker(cfg, tmp_path / "a", rank=0, params={})
    b = Tracker(cfg, tmp_path / "b", rank=0, params={})
    a.close("FINISHED")
    assert client.get_run(parent).info.status == "RUNNING"  # b still runs
    b.close("FINISHED")
    assert client.get_run(parent).info.status == "FINISHED"
    run = client.get_run(a.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.run_name == "t-3"
    assert run.info.experiment_id == exp

    again = Tracker(cfg, tmp_path / "b", rank=0, params={})  # b requeued: the sweep runs again
    again.log({"loss": 1.0}, step=1)
    deadline = time.monotonic() + 10
    while client.get_run(parent).info.status != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get_run(parent).info.status == "RUNNING"
    again.close("FAILED")
    assert client.get_run(parent).info.status == "FAILED"


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
    assert not (tmp_path / "r0" / STATE_NAME).exists()


def test_down_server_never_blocks_logging_and_the_next_job_sends_it_all(
    store, client, tmp_path, caplog
):
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lmu_asr"):
        tracker = Tracker(TrackingConfig(uri=uri), tmp_path, rank=0, params={"lr": 0.1})
        t0 = time.monotonic()
        for step in range(1, 201):
            tracker.log({"loss": 1.0 / step}, step=step)
        logging_s = time.monotonic() - t0
        tracker.log_artifact(tmp_path / "metrics.jsonl")
        tracker.close()
    assert logging_s < 1.0  # appends to metrics.jsonl only; the thread meets the down server
    assert time.monotonic() - start < 20  # a down server costs seconds at the end, not minutes
    warnings = [r for r in caplog.records if "unreachable or failing" in r.getMessage()]
    assert len(warnings) == 1 and uri in warnings[0].getMessage()
    assert "tracking sync" in caplog.text
    assert tracker.run_id is None and read_state(tmp_path)["offset"] == 0

    # the requeued job finds the store reachable: everything goes to its run, in order
    cfg = TrackingConfig(uri=store, experiment="replay")
    tracker = Tracker(cfg, tmp_path, rank=0, params={"lr": 0.1})
    tracker.log({"loss": 0.1}, step=201)
    tracker.close()
    assert [s for s, _ in _history(client, tracker.run_id, "loss")] == list(range(1, 202))
    _history_equals_jsonl(client, tracker.run_id, tmp_path)
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["metrics.jsonl"]


def test_server_back_mid_job_catches_up_in_order(store, client, tmp_path, caplog, monkeypatch):
    calls = []
    real = MlflowClient.log_batch

    def flaky(self, *args, **kwargs):  # the first two sends fail as a dropped connection would
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionError("server went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    cfg = TrackingConfig(uri=store, experiment="flaky")
    jsonl = JsonlSink(tmp_path / "metrics.jsonl")
    mirror = MlflowMirror(store, "flaky", tmp_path, "flaky", {}, {}, retry_s=0.2, poll_s=0.05)
    mirror.start()
    for step in (1, 2, 3):
        jsonl.log({"loss": float(step)}, step)
    deadline = time.monotonic() + 20
    while read_state(tmp_path)["offset"] < (tmp_path / "metrics.jsonl").stat().st_size:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    assert mirror.close("FINISHED")
    assert _history(client, mirror.run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert caplog.text.count("unreachable or failing") == 1 and "reachable again" in caplog.text
    assert cfg.experiment == client.get_experiment(read_state(tmp_path)["experiment_id"]).name


def test_sync_after_a_job_that_ended_during_an_outage(store, client, tmp_path, monkeypatch):
    """The job ran and ended while the server was down; `tracking sync` sends it all and marks
    the run FINISHED. Sent again (a kill between a send and the cursor), nothing doubles."""
    uri = store
    monkeypatch.setattr(MlflowClient, "log_batch", _refuse)
    tracker = Tracker(TrackingConfig(uri=uri, experiment="sync"), tmp_path, rank=0, params={})
    for step in (1, 2, 3):
        tracker.log({"loss": float(step)}, step=step)
    tracker.close()
    monkeypatch.undo()
    (tmp_path / "results.json").write_text("{}")
    assert read_state(tmp_path)["offset"] == 0
    assert tracking_main(["sync", str(tmp_path)]) == 0
    run_id = read_state(tmp_path)["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    _history_equals_jsonl(client, run_id, tmp_path)

    state = read_state(tmp_path)
    (tmp_path / STATE_NAME).write_text(json.dumps(state | {"offset": 0}))
    assert tracking_main(["sync", str(tmp_path)]) == 0
    assert _history(client, run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]


def _refuse(self, *args, **kwargs):
    raise ConnectionError("connection refused")


def test_rejected_metrics_are_dropped_not_retried(store, client, tmp_path, caplog):
    cfg = TrackingConfig(uri=store, experiment="rejected")
    tracker = Tracker(cfg, tmp_path, rank=0, params={})
    tracker.log({"bad?name": 1.0}, 1)
    tracker.log({"loss": 1.0}, 2)
    tracker.close()
    assert "rejected metrics" in caplog.text
    assert _history(client, tracker.run_id, "loss") == [(2, 1.0)]
    assert read_state(tmp_path)["offset"] == (tmp_path / "metrics.jsonl").stat().st_size


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


def test_a_run_gone_from_the_store_is_started_again_with_everything(store, client, tmp_path):
    cfg = TrackingConfig(uri=store, experiment="gone")
    first = Tracker(cfg, tmp_path, rank=0, params={})
    first.log({"loss": 1.0}, step=1)
    first.close(None)
    client.delete_run(first.run_id)  # and the store was cleaned up: the id now names nothing
    (tmp_path / STATE_NAME).write_text(json.dumps(read_state(tmp_path) | {"run_id": "0" * 32}))
    second = Tracker(cfg, tmp_path, rank=0, params={})
    second.log({"loss": 0.5}, step=2)
    second.close()
    assert second.run_id not in (first.run_id, "0" * 32)
    assert _history(client, second.run_id, "loss") == [(1, 1.0), (2, 0.5)]
    assert read_state(tmp_path)["uri"] == store and read_state(tmp_path)["experiment"] == "gone"
