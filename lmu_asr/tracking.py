"""Metrics sinks: `metrics.jsonl` (always) and MLflow (optional), both on rank 0 only.

MLflow problems never stop training: what cannot be sent is spooled to
`<run_dir>/mlflow-spool.jsonl` and replayed once the server answers again (in this job, after a
back-off, or in the next job that uses the same run dir).

Tracking URI: `tracking.uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`,
which is MLflow's own default, so `mlflow ui` started in the same folder shows the runs. Artifacts
of a local sqlite store go to `mlartifacts/` next to the database. On a cluster use a server
(`http://host:port`); many jobs writing one sqlite file on a network file system do not mix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPOOL_NAME = "mlflow-spool.jsonl"
MAX_PARAM_KEY, MAX_PARAM_VALUE = 250, 6000  # mlflow.utils.validation limits
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100
# Short HTTP retries so a down server costs seconds, not MLflow's default minutes. Process-wide
# (MLflow reads them from the environment); set only when the user has not set them.
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}  # retrying will not help
_STATUSES = {"FINISHED", "FAILED", "KILLED"}


@dataclass
class TrackingConfig:
    enabled: bool = True  # MLflow on/off; metrics.jsonl is always written
    uri: str | None = None
    experiment: str = "lmu_asr"
    run_name: str | None = None  # None: the run dir's name
    parent_run_id: str | None = None  # sweeps: tag `mlflow.parentRunId`

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError(f"tracking.experiment must not be empty, got {self.experiment!r}")


def resolve_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd()}/mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"  # same for every job
    return uri


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; keys and values cut to MLflow's limits."""
    out = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        else:
            out[key[:MAX_PARAM_KEY]] = str(v)[:MAX_PARAM_VALUE]
    return out


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


class JsonlSink:
    """Appends flushed `{"step", "time", **metrics}` lines; non-finite values become null.

    Every (metric, step) is written once: a job resumed from a checkpoint older than its last
    logged steps (after a kill without warning) does not write those steps again."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.logged: dict[str, int] = {}  # metric -> the last step it was written at
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(ValueError):  # the half line of a killed job
                    row = json.loads(line)
                    for k in row.keys() - {"step", "time"}:
                        self.logged[k] = max(self.logged.get(k, -1), row["step"])
        self._f = open(self.path, "a+b")  # noqa: SIM115 (kept open for the whole run)
        if self._f.tell() > 0:  # a killed job may have left half a line: start a new one
            self._f.seek(-1, os.SEEK_END)
            if self._f.read(1) != b"\n":
                self._f.write(b"\n")

    def new(self, metrics: Mapping[str, float], step: int) -> dict[str, float]:
        """The metrics not yet logged at `step` (all of them, unless this step is a replay)."""
        return {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        row: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        if clash := row.keys() & metrics.keys():
            raise ValueError(f"metric names {sorted(clash)} are reserved in metrics.jsonl")
        row.update({k: _finite_or_none(v) for k, v in metrics.items()})
        self._f.write((json.dumps(row, allow_nan=False) + "\n").encode())
        self._f.flush()
        self.logged |= dict.fromkeys(metrics, int(step))

    def close(self) -> None:
        self._f.close()


class MlflowSink:
    """One MLflow run through an explicit `MlflowClient` (no global tracking URI or active run).

    Creates the experiment and a run, or resumes `run_id` (params missing from it are logged,
    existing ones are left alone). Failures are spooled and retried after a back-off that starts
    at `retry_s` and doubles up to 10 minutes."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_id: str | None,
        run_name: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        *,
        spool_path: Path,
        retry_s: float = 30.0,
    ) -> None:
        for k, v in CLIENT_ENV.items():
            os.environ.setdefault(k, v)
        self.cfg, self.uri, self.run_id = cfg, resolve_uri(cfg.uri), run_id
        self.spool_path = Path(spool_path)
        self.client: Any = None
        self._run_name, self._params, self._tags = run_name, flatten_params(params), dict(tags)
        self._ready, self._warned = False, False
        self._retry_s, self._delay, self._next_try = retry_s, retry_s, 0.0
        self._deliver([])  # start the run now and replay what an earlier job spooled

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        entry = {"kind": "metrics", "step": int(step), "time_ms": int(time.time() * 1000)}
        self._deliver([{**entry, "metrics": {k: float(v) for k, v in metrics.items()}}])

    def log_artifact(self, path: Path) -> None:
        self._deliver([{"kind": "artifact", "path": str(Path(path).resolve())}])

    def close(self, status: str = "FINISHED") -> None:
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {sorted(_STATUSES)}, got {status!r}")
        self._next_try = 0.0  # one last try whatever the back-off
        self._deliver([])
        if not self._ready or self.spool_path.exists():
            log.warning(
                f"MLflow at {self.uri} unreachable at close: run not marked {status}; "
                f"the next job in this run dir replays {self.spool_path}"
            )
            return
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            log.warning(f"MLflow at {self.uri}: could not mark run {self.run_id} {status}: {e}")

    def _deliver(self, entries: list[dict]) -> None:
        if time.monotonic() < self._next_try:
            return self._spool(entries)
        try:
            if not self._ready:
                self._start_run()
            self._replay()
            self._send(entries)
        except Exception as e:
            self._spool(entries)
            self._next_try = time.monotonic() + self._delay
            if not self._warned:
                log.warning(
                    f"MLflow at {self.uri} unreachable or failing ({str(e)[:300]}); "
                    f"training goes on, spooling to {self.spool_path}, next try in "
                    f"{self._delay:.0f} s"
                )
            self._warned, self._delay = True, min(2 * self._delay, 600.0)
            return
        if self._warned:
            log.warning(f"MLflow at {self.uri} reachable again; spooled metrics replayed")
        self._warned, self._delay = False, self._retry_s

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
                tags = [RunTag(k, v) for k, v in self._tags.items()]  # this job's host, job id
                self._call("tags", tags=tags)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning(f"MLflow run {self.run_id} not found at {self.uri}; starting a new one")
                self.run_id = None
        if self.run_id is None:
            tags = dict(self._tags)
            if self.cfg.parent_run_id:
                tags["mlflow.parentRunId"] = self.cfg.parent_run_id
            run = self.client.create_run(self._experiment_id(), run_name=self._run_name, tags=tags)
            self.run_id = run.info.run_id
        todo = [Param(k, v) for k, v in self._params.items() if k not in logged]
        for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
            self._call("params", params=todo[i : i + MAX_PARAMS_PER_BATCH])
        self._ready = True

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.cfg.experiment
        if (exp := self.client.get_experiment_by_name(name)) is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # not MLflow's default ./mlruns in the cwd
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another job of the sweep created it first
            if (exp := self.client.get_experiment_by_name(name)) is None:
                raise
            return exp.experiment_id

    def _call(self, what: str, **batch: Any) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_batch(self.run_id, **batch)
        except MlflowException as e:
            if e.error_code not in _REJECTED:
                raise
            log.warning(f"MLflow at {self.uri} rejected {what}, dropped: {str(e)[:300]}")

    def _send(self, entries: list[dict]) -> None:
        """Send in order, metrics batched; raises with `entries` updated to what is left."""
        from mlflow.entities import Metric

        while entries:
            if entries[0]["kind"] == "artifact":
                if Path(entries[0]["path"]).exists():
                    self.client.log_artifact(self.run_id, entries[0]["path"])
                else:
                    log.warning("artifact %s no longer exists, not logged", entries[0]["path"])
                del entries[0]
                continue
            n, metrics = 0, []
            while n < len(entries) and entries[n]["kind"] == "metrics":
                more = [
                    Metric(k, v, entries[n]["time_ms"], entries[n]["step"])
                    for k, v in entries[n]["metrics"].items()
                ]
                if metrics and len(metrics) + len(more) > MAX_METRICS_PER_BATCH:
                    break
                metrics, n = metrics + more, n + 1
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self._call("metrics", metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
            del entries[:n]

    def _replay(self) -> None:
        if not self.spool_path.exists():
            return
        lines = self.spool_path.read_text().splitlines()
        entries = []
        for line in lines:
            with contextlib.suppress(ValueError):  # the half line of a killed job
                entries.append(json.loads(line))
        try:
            self._send(entries)
        except Exception:
            tmp = self.spool_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
            os.replace(tmp, self.spool_path)  # keep only what was not sent
            raise
        self.spool_path.unlink()
        log.info("MLflow: replayed %d spooled entries from %s", len(lines), self.spool_path)

    def _spool(self, entries: list[dict]) -> None:
        if entries:
            with open(self.spool_path, "a") as f:
                f.write("".join(json.dumps(e) + "\n" for e in entries))


class Tracker:
    """What the trainer uses: JSONL + MLflow on rank 0; a no-op on every other rank."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        rank: int,
        params: Mapping[str, Any],
        run_id: str | None = None,
    ) -> None:
        run_dir = Path(run_dir)
        self._run_id = run_id
        self.jsonl: JsonlSink | None = None
        self.mlflow: MlflowSink | None = None
        if rank != 0:
            return
        self.jsonl = JsonlSink(run_dir / "metrics.jsonl")
        if cfg.enabled:
            tags = {"run_dir": str(run_dir.resolve()), "host": socket.gethostname()}
            if os.environ.get("SLURM_JOB_ID"):
                tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
            name = cfg.run_name or run_dir.name
            spool = run_dir / SPOOL_NAME
            self.mlflow = MlflowSink(cfg, run_id, name, params, tags, spool_path=spool)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None until the run exists on the server (store it when saving)."""
        return self.mlflow.run_id if self.mlflow else self._run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log to both sinks, leaving out what metrics.jsonl already holds for this step (the
        steps a resumed job replays), so MLflow and metrics.jsonl keep every step once."""
        if not self.jsonl or not (metrics := self.jsonl.new(metrics, step)):
            return
        self.jsonl.log(metrics, step)
        if self.mlflow:
            self.mlflow.log(metrics, step)

    def log_artifact(self, path: Path) -> None:
        if self.mlflow:
            self.mlflow.log_artifact(path)

    def close(self, status: str = "FINISHED") -> None:
        if self.mlflow:
            self.mlflow.close(status)
            self._run_id, self.mlflow = self.mlflow.run_id, None
        if self.jsonl:
            self.jsonl.close()
            self.jsonl = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type | None, *_: Any) -> None:
        interrupted = exc_type is not None and not issubclass(exc_type, Exception)
        self.close("FINISHED" if exc_type is None else "KILLED" if interrupted else "FAILED")
