"""One MLflow parent run per sweep, whose jobs are its child runs.

`ParentRun` is a Hydra callback (registered in conf/config.yaml). In the launching process,
before any job starts, it creates the parent run in the study's experiment and hands its id to
the jobs through $LMU_ASR_MLFLOW_PARENT (local jobs inherit it, sbatch passes the environment
on, a requeued job keeps it), which conf/tracking/*.yaml read into `tracking.parent_run_id`. It
also records the parent in `<sweep_dir>/sweep.json` for `lmu_asr.status`.

A queued sweep returns long before its jobs end, so the jobs keep the parent's state: each job
calls `settle_parent` when it starts and when it ends; the parent is RUNNING while any child is,
and ends FAILED if a child failed, else KILLED if one was killed, else FINISHED, once as many
children as the sweep has jobs have ended.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ENV_VAR = "LMU_ASR_MLFLOW_PARENT"
JOBS_TAG = "lmu_asr.jobs"  # how many jobs the sweep launched
_ENDED = ("FINISHED", "FAILED", "KILLED")


def settle_parent(client: Any, parent_id: str) -> str:
    """Set the parent run's state from its children's; returns it. Never raises for a state
    that cannot be decided yet (fewer children than jobs, or the job count not yet known)."""
    parent = client.get_run(parent_id)
    jobs = int(parent.data.tags.get(JOBS_TAG, 0))
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=10000,
    )
    states = [c.info.status for c in children]
    if jobs and len(children) >= jobs and all(s in _ENDED for s in states):
        state = next((s for s in ("FAILED", "KILLED") if s in states), "FINISHED")
        if parent.info.status != state:
            client.set_terminated(parent_id, state)
        return state
    if parent.info.status != "RUNNING":
        client.update_run(parent_id, "RUNNING")
    return "RUNNING"


class ParentRun(Callback):
    """Hydra callback: the parent run of a multirun (a no-op when tracking is off)."""

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = config.tracking
        if not tracking.enabled or os.environ.get(ENV_VAR):
            return
        from mlflow import MlflowClient  # seconds to import: only when tracking

        from lmu_asr.mlflow_mirror import experiment_id, run_url, use_short_retries
        from lmu_asr.tracking import git_commit, resolve_uri

        uri = resolve_uri(tracking.uri)
        use_short_retries()  # a down server costs seconds, not MLflow's minutes
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = experiment_id(self.client, uri, tracking.experiment)
            tags = {"sweep_dir": str(sweep_dir), "git_commit": git_commit()}
            tags["mlflow.note.content"] = "overrides: " + " ".join(config.hydra.overrides.task)
            name = f"{sweep_dir.parent.name}/{sweep_dir.name}"
            run = self.client.create_run(experiment, run_name=name, tags=tags)
        except Exception as e:  # the sweep goes on; its jobs are then top-level runs
            log.warning(f"MLflow at {uri}: no parent run for this sweep ({str(e)[:300]})")
            return
        self.run_id = run.info.run_id
        os.environ[ENV_VAR] = self.run_id
        record = {"uri": uri, "experiment_id": experiment, "run_id": self.run_id}
        record["url"] = run_url(uri, experiment, self.run_id)
        _update_sweep_json(sweep_dir, {"mlflow": record})
        log.info("MLflow parent run %s (%s)", self.run_id, record["url"] or uri)
        swept = config.hydra.sweeper.get("params")  # None for a sweep of command-line values
        swept = OmegaConf.to_container(swept) if swept else {}
        try:
            for key, value in swept.items():
                self.client.log_param(self.run_id, f"sweep.{key}", str(value)[:6000])
        except Exception as e:
            log.warning(f"MLflow: the sweep's params were not logged ({str(e)[:300]})")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        path = sweep_dir / "sweep.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        jobs = len(record.get("jobs", [])) or len(list(sweep_dir.glob("[0-9]*/")))
        try:
            self.client.set_tag(self.run_id, JOBS_TAG, str(jobs))
            settle_parent(self.client, self.run_id)  # ended already if the launcher waited
        except Exception as e:
            log.warning(f"MLflow: could not update parent run {self.run_id}: {str(e)[:300]}")
        os.environ.pop(ENV_VAR, None)


def _update_sweep_json(sweep_dir: Path, fields: dict) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / "sweep.json"
    record = json.loads(path.read_text()) if path.exists() else {"jobs": []}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record | fields, indent=2) + "\n")
    tmp.replace(path)
