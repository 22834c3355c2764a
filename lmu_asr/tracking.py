"""What a run records: `metrics.jsonl` (always) and its MLflow mirror (optional), rank 0 only.

MLflow problems never stop or slow training: a background thread copies metrics.jsonl to the
server and catches up after an outage (mlflow_mirror.py). `python -m lmu_asr.tracking sync
RUN_DIR` sends whatever a run directory has not sent yet, e.g. after its job ended during one.

Tracking URI: `tracking.uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`,
which is MLflow's own default, so `mlflow ui` started in the same folder shows the runs. Artifacts
of a local sqlite store go to `mlartifacts/` next to the database. On a cluster use a server
(`http://host:port`); many jobs writing one sqlite file on a network file system do not mix.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmu_asr.mlflow_mirror import MlflowMirror, read_state

log = logging.getLogger(__name__)

URI_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
MAX_PARAM_KEY, MAX_PARAM_VALUE = 250, 6000  # mlflow.utils.validation limits


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
        scheme = urlparse(self.uri or "").scheme.split("+")[0]  # postgresql+psycopg2://...
        if scheme not in URI_SCHEMES or (
            scheme in ("http", "https") and not urlparse(self.uri).netloc
        ):
            raise ValueError(
                f"tracking.uri={self.uri!r} is not an MLflow tracking URI: use http(s)://HOST:PORT,"
                " sqlite:///FILE.db, file:///DIR, a folder or a database URL"
            )


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


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file a job may have been killed while writing: [] if there is none;
    a line that is not JSON (the half line of a killed job) is left out."""
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


class JsonlSink:
    """Appends flushed `{"step", "time", **metrics}` lines; non-finite values become null.

    Every (metric, step) is written once: a job resumed from a checkpoint older than its last
    logged steps (after a kill without warning) does not write those steps again."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.logged: dict[str, int] = {}  # metric -> the last step it was written at
        for row in read_jsonl(self.path):
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


def git_commit() -> str:
    """The commit of the lmu_asr source that runs ("-dirty" with uncommitted changes)."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_tags(run_dir: Path, params: Mapping[str, Any], world_size: int) -> dict[str, str]:
    """What identifies this job: where, which code, which config, which SLURM job and restart."""
    config = json.dumps(params, sort_keys=True, default=str)
    tags = {"run_dir": str(Path(run_dir).resolve()), "host": socket.gethostname()}
    tags |= {"git_commit": git_commit(), "world_size": str(world_size)}
    tags["config_hash"] = hashlib.sha256(config.encode()).hexdigest()[:12]
    slurm = {"SLURM_JOB_ID": "slurm_job_id", "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",
             "SLURM_ARRAY_TASK_ID": "slurm_array_task_id", "SLURM_JOB_NODELIST": "hosts",
             "SLURM_RESTART_COUNT": "restart_count"}  # fmt: skip
    tags |= {tag: os.environ[var] for var, tag in slurm.items() if os.environ.get(var)}
    if "SLURM_JOB_ID" in os.environ:
        tags.setdefault("restart_count", "0")
    return tags


class Tracker:
    """What the trainer uses: metrics.jsonl + its MLflow mirror on rank 0; a no-op elsewhere."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        rank: int,
        params: Mapping[str, Any],
        run_id: str | None = None,
        world_size: int = 1,
    ) -> None:
        run_dir = Path(run_dir)
        self._run_id = run_id
        self.jsonl: JsonlSink | None = None
        self.mlflow: MlflowMirror | None = None
        if rank != 0:
            return
        self.jsonl = JsonlSink(run_dir / "metrics.jsonl")
        if cfg.enabled:
            self.mlflow = mirror_for(cfg, run_dir, params, run_tags(run_dir, params, world_size))
            if run_id and not self.mlflow.run_id:  # a run dir from before tracking.json
                self.mlflow.state["run_id"] = run_id
            self.mlflow.start()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None until the run exists on the server."""
        return self.mlflow.run_id if self.mlflow else self._run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Append to metrics.jsonl (which the mirror sends on), leaving out what it already
        holds for this step (the steps a resumed job replays): every step is logged once."""
        if self.jsonl and (metrics := self.jsonl.new(metrics, step)):
            self.jsonl.log(metrics, step)

    def log_artifact(self, path: Path) -> None:
        if self.mlflow:
            self.mlflow.log_artifact(path)

    def close(self, status: str | None = "FINISHED") -> None:
        """End the run: FINISHED, FAILED, KILLED, or None for a job that will be requeued (its
        run stays RUNNING)."""
        if self.jsonl:
            self.jsonl.close()
            self.jsonl = None
        if self.mlflow:
            self.mlflow.close(status)
            self._run_id, self.mlflow = self.mlflow.run_id, None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type | None, *_: Any) -> None:
        interrupted = exc_type is not None and not issubclass(exc_type, Exception)
        self.close("FINISHED" if exc_type is None else "KILLED" if interrupted else "FAILED")


def mirror_for(
    cfg: TrackingConfig, run_dir: Path, params: Mapping[str, Any], tags: Mapping[str, str]
) -> MlflowMirror:
    """The mirror of `run_dir`; with a parent (a sweep's job), it keeps the parent's state."""
    from lmu_asr.parent_run import settle_parent

    def settle(client: Any, _run_id: str) -> None:
        if cfg.parent_run_id:
            try:
                settle_parent(client, cfg.parent_run_id)
            except Exception as e:
                log.warning(f"MLflow: parent run {cfg.parent_run_id} not updated: {e}")

    uri = resolve_uri(cfg.uri)
    return MlflowMirror(
        uri, cfg.experiment, run_dir, cfg.run_name or Path(run_dir).name, flatten_params(params),
        tags, cfg.parent_run_id, on_start=settle, on_end=settle,
    )  # fmt: skip


def sync(run_dir: Path) -> int:
    """Send what `run_dir` has not sent to its MLflow run, and end the run if its job ended."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    if not state.get("uri"):
        print(f"{run_dir}: no {run_dir / 'tracking.json'}: MLflow was off for this run")
        return 1
    cfg = TrackingConfig(
        uri=state["uri"],
        experiment=state.get("experiment") or "lmu_asr",
        run_name=state.get("run_name"),
        parent_run_id=state.get("parent_run_id"),
    )
    params = {}
    config = run_dir / ".hydra" / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        with contextlib.suppress(Exception):  # interpolations that no longer resolve
            params = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    mirror = mirror_for(cfg, run_dir, params, {})
    status = ended_status(run_dir)
    if not mirror.close(status):  # sends what is left, then ends the run
        print(f"{run_dir}: MLflow at {cfg.uri} unreachable: {mirror.last_error}")
        return 1
    print(f"{run_dir}: sent to run {mirror.run_id}" + (f", marked {status}" if status else ""))
    return 0


def ended_status(run_dir: Path) -> str | None:
    """FINISHED if the run directory's job has finished, FAILED if it failed, else None (it
    runs, or stopped and may come back)."""
    if (run_dir / "results.json").exists():
        return "FINISHED"
    events = read_jsonl(run_dir / "lifecycle.jsonl")
    last = events[-1] if events else {}
    return "FAILED" if last.get("event") == "stop" and last.get("reason") == "failed" else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmu_asr.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync", help="send what run directories have not yet sent to MLflow")
    s.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return max(sync(d) for d in args.run_dirs)


if __name__ == "__main__":
    sys.exit(main())
