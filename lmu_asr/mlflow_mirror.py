"""Mirror a run directory into one MLflow run, from a background thread.

`metrics.jsonl` is the record; MLflow is a copy of it. A thread sends the lines after a cursor
(a byte offset kept in `<run_dir>/tracking.json`, with the run's id, URI and link) and the
artifacts still pending, so training never waits on the server: when it is down the cursor stops
and the lines wait in metrics.jsonl, sent in order once it answers (in this job, after a
back-off; in the next job of the same run directory; or by `python -m lmu_asr.tracking sync
RUN_DIR`). A metric's timestamp is its line's, so a batch sent again after a kill between the
send and the cursor update is the same metric, which MLflow's store keeps once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_NAME = "tracking.json"
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100  # MLflow's log_batch limits
# Short HTTP retries so a down server costs seconds, not MLflow's default minutes. Process-wide
# (MLflow reads them from the environment); set only when the user has not set them.
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # the log says where the run is, once
}
_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}  # sending again will not help
STATUSES = ("FINISHED", "FAILED", "KILLED")


def use_short_retries() -> None:
    """MLflow's HTTP retries as CLIENT_ENV says, unless the user has set them."""
    for k, v in CLIENT_ENV.items():
        os.environ.setdefault(k, v)


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of a tracking server; None for a local store."""
    return f"{uri}/#/experiments/{experiment_id}/runs/{run_id}" if uri.startswith("http") else None


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def experiment_id(client: Any, uri: str, name: str) -> str:
    """The id of experiment `name`, created (or restored) if needed."""
    from mlflow.exceptions import MlflowException

    if (exp := client.get_experiment_by_name(name)) is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # not MLflow's default ./mlruns in the cwd
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another job of the sweep created it first
        if (exp := client.get_experiment_by_name(name)) is None:
            raise
        return exp.experiment_id


class MlflowMirror:
    """Sends `<run_dir>/metrics.jsonl` and artifacts to one MLflow run (a new one, or the one
    recorded in tracking.json). `on_start(client, run_id)` runs once the run exists, `on_end`
    once it has ended."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_dir: Path,
        run_name: str,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        *,
        retry_s: float = 30.0,
        poll_s: float = 1.0,
        on_start: Callable[[Any, str], None] | None = None,
        on_end: Callable[[Any, str], None] | None = None,
    ) -> None:
        use_short_retries()
        self.uri, self.experiment, self.run_dir = uri, experiment, Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.state = read_state(self.run_dir)
        if self.state.get("uri") not in (None, uri):  # another server: all of it, to a new run
            self.state = {"artifacts": self.state.get("artifacts", [])}
        self.state.setdefault("offset", 0)
        self.state.setdefault("artifacts", [])
        # what `tracking sync` needs to create the run if the server was down all along
        self.state |= {"uri": uri, "experiment": experiment, "run_name": run_name}
        self.state |= {"parent_run_id": parent_run_id}
        self._run_name, self._params, self._tags = run_name, dict(params), dict(tags)
        self._parent, self._on_start, self._on_end = parent_run_id, on_start, on_end
        self._retry_s, self._poll_s = retry_s, poll_s
        self.client: Any = None
        self.last_error = ""
        self._ready = False
        self._lock = threading.RLock()  # guards state["artifacts"] and tracking.json
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._save_state()

    @property
    def run_id(self) -> str | None:
        return self.state.get("run_id")

    def start(self) -> MlflowMirror:
        self._thread = threading.Thread(target=self._loop, name="mlflow-mirror", daemon=True)
        self._thread.start()
        return self

    def log_artifact(self, path: Path) -> None:
        with self._lock:
            self.state["artifacts"].append(str(Path(path).resolve()))
        self._save_state()  # kept for the next job or `tracking sync` if the server is down

    def close(self, status: str | None, timeout_s: float = 30.0) -> bool:
        """Send what is left (waiting up to `timeout_s`), then end the run with `status` (None:
        leave it RUNNING, for a job that comes back). True if everything reached the server."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES} or None, got {status!r}")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning(f"MLflow at {self.uri} still busy after {timeout_s:.0f} s; leaving")
                return False
        done = self.sync_once()  # the last lines, also when the thread gave up on a back-off
        if not done:
            log.warning(
                f"MLflow at {self.uri} unreachable: run not complete there; the next job in "
                f"this run directory, or `python -m lmu_asr.tracking sync {self.run_dir}`, "
                "sends the rest"
            )
            return False
        try:
            if status is not None:
                self.client.set_terminated(self.run_id, status)
            if self._on_end is not None:
                self._on_end(self.client, self.run_id)
        except Exception as e:
            log.warning(f"MLflow at {self.uri}: could not mark run {self.run_id} {status}: {e}")
            return False
        return True

    def sync_once(self) -> bool:
        """Start or resume the run and send everything not yet sent. True if all of it went."""
        try:
            if not self._ready:
                self._start_run()
            self._send_metrics()
            self._send_artifacts()
            return True
        except Exception as e:
            self.last_error = str(e)[:300]
            return False

    def _loop(self) -> None:
        delay, warned = self._poll_s, False
        while not self._stop.is_set():
            if self.sync_once():
                if warned:
                    log.warning(f"MLflow at {self.uri} reachable again; the backlog is sent")
                delay, warned = self._poll_s, False
            else:
                delay = self._retry_s if delay == self._poll_s else min(2 * delay, 600.0)
                if not warned:
                    log.warning(
                        f"MLflow at {self.uri} unreachable or failing ({self.last_error}); "
                        f"training goes on, metrics wait in {self.metrics_path}, next try in "
                        f"{delay:.0f} s"
                    )
                warned = True
            self._stop.wait(delay)

    def _start_run(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        self.client = self.client or MlflowClient(tracking_uri=self.uri)
        logged: Mapping[str, str] = {}
        if self.run_id is not None:
            try:
                run = self.client.get_run(self.run_id)
                logged = run.data.params
                if run.info.status != "RUNNING":
                    self.client.update_run(self.run_id, status="RUNNING")
                tags = [RunTag(k, v) for k, v in self._tags.items()]  # this job's host, ids
                self._call("tags", tags=tags)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning(f"MLflow run {self.run_id} not found at {self.uri}; starting a new one")
                keep = ("uri", "experiment", "run_name", "parent_run_id", "artifacts")
                self.state = {k: self.state[k] for k in keep} | {"offset": 0}
        if self.run_id is None:
            tags = dict(self._tags)
            experiment = None
            if self._parent:  # a child lives in its parent's experiment
                tags["mlflow.parentRunId"] = self._parent
                experiment = self.client.get_run(self._parent).info.experiment_id
            experiment = experiment or experiment_id(self.client, self.uri, self.experiment)
            run = self.client.create_run(experiment, run_name=self._run_name, tags=tags)
            self.state |= {"experiment_id": experiment, "run_id": run.info.run_id}
            self.state["url"] = run_url(self.uri, experiment, run.info.run_id)
            self._save_state()
        todo = [Param(k, v) for k, v in self._params.items() if k not in logged]
        for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
            self._call("params", params=todo[i : i + MAX_PARAMS_PER_BATCH])
        self._ready = True
        log.info("MLflow run %s: %s", self.run_id, self.state.get("url") or self.uri)
        if self._on_start is not None:
            self._on_start(self.client, self.run_id)

    def _send_metrics(self) -> None:
        """The complete lines after the cursor, in order, up to 1000 metrics per request; the
        cursor moves after each request that succeeded (or was rejected: never sent again)."""
        from mlflow.entities import Metric

        if not self.metrics_path.exists():
            return
        with open(self.metrics_path, "rb") as f:
            f.seek(self.state["offset"])
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is sent next time
        offset, lines, n = self.state["offset"], [], 0
        for raw in data[:end].splitlines(keepends=True):
            try:
                row = json.loads(raw)
            except ValueError:  # the half line of a killed job
                row = {}
            metrics = [
                Metric(k, math.nan if v is None else float(v), int(row["time"] * 1000), row["step"])
                for k, v in row.items()
                if k not in ("step", "time")
            ]
            if lines and n + len(metrics) > MAX_METRICS_PER_BATCH:
                self._send_lines(lines)
                self._advance(offset)
                lines, n = [], 0
            lines.append(metrics)
            n += len(metrics)
            offset += len(raw)
        self._send_lines(lines)
        self._advance(offset)

    def _send_lines(self, lines: list[list[Any]]) -> None:
        """One request; if MLflow rejects it, one per line, so one bad line loses only itself."""
        if any(lines) and not self._call("metrics", quiet=len(lines) > 1, metrics=sum(lines, [])):
            for metrics in lines:
                if metrics:
                    self._call("metrics", metrics=metrics)

    def _advance(self, offset: int) -> None:
        if offset != self.state["offset"]:
            self.state["offset"] = offset
            self._save_state()

    def _send_artifacts(self) -> None:
        while self.state["artifacts"]:
            path = self.state["artifacts"][0]
            if Path(path).exists():
                self.client.log_artifact(self.run_id, path)
            else:
                log.warning("artifact %s no longer exists, not logged", path)
            with self._lock:
                self.state["artifacts"].pop(0)
            self._save_state()

    def _call(self, what: str, quiet: bool = False, **batch: Any) -> bool:
        """log_batch; False if MLflow rejected it (sending it again would not help)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_batch(self.run_id, **batch)
        except MlflowException as e:
            if e.error_code not in _REJECTED:
                raise
            if not quiet:
                log.warning(f"MLflow at {self.uri} rejected {what}, dropped: {str(e)[:300]}")
            return False
        return True

    def _save_state(self) -> None:
        path = self.run_dir / STATE_NAME
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with self._lock:  # both threads save: one at a time, so the newest state wins
            tmp.write_text(json.dumps(self.state, indent=2) + "\n")
            os.replace(tmp, path)
