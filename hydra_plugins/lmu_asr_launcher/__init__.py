"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): a sweep becomes one SLURM job array
through submitit, and `launch -m` returns as soon as the array is queued. The stock
hydra-submitit-launcher blocks until every job has ended (Hydra issue 2479), which keeps a login
shell open for days; `hydra.launcher.wait=true` restores that behaviour.

In the job, a failed task raises, so SLURM records the job as FAILED, with the traceback in the
job's train.log and submitit's log (the stock launcher returns the exception as the job's result,
and the job ends COMPLETED).

Hydra only instantiates launchers defined under the `hydra_plugins` package, hence this file.
(No `from __future__ import annotations`: Hydra executes plugin modules before registering them
in sys.modules, and dataclasses then cannot resolve string annotations.)

Each task starts through `python -m lmu_asr.task_start`, which holds SLURM's time-limit warning
until the training loop's handler takes it (see there why)."""

import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class QueuedSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.lmu_asr_launcher.QueuedSlurmLauncher"
    wait: bool = False  # block until every job has ended, as the stock launcher does
    srun_args: list[str] | None = None  # submitit's, which the stock launcher does not pass


ConfigStore.instance().store(
    group="hydra/launcher", name="lmu_slurm", node=QueuedSlurmConf, provider="lmu_asr"
)


class QueuedSlurmLauncher(SlurmLauncher):
    def __init__(self, wait: bool = False, **params: Any) -> None:
        super().__init__(**params)
        self.wait = wait

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED:
            err = ret._return_value
            # into the job's own train.log / train-rank<N>.log, which Hydra's logging still writes
            logging.getLogger("lmu_asr").error("job failed", exc_info=err)
            raise err
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        import submitit  # lazily: Hydra imports every plugin at start-up

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        executor = submitit.AutoExecutor(
            folder=self.params["submitit_folder"],
            cluster="slurm",
            slurm_max_num_timeout=self.params["max_num_timeout"],
            slurm_python=f"{shlex.quote(sys.executable)} -m lmu_asr.task_start",
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                k if k in shared else f"slurm_{k}": v
                for k, v in self.params.items()
                if k not in {"submitit_folder", "max_num_timeout"}
            }
        )
        nums = range(initial_job_idx, initial_job_idx + len(job_overrides))
        for num, overrides in zip(nums, job_overrides):
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        state = Singleton.get_state()
        jobs = executor.map_array(
            self,
            [list(o) for o in job_overrides],
            ["hydra.sweep.dir"] * len(job_overrides),
            list(nums),
            [f"job_id_for_{n}" for n in nums],
            [state] * len(job_overrides),
        )
        _record(sweep_dir, jobs, job_overrides, nums)
        if self.wait:
            return [job.results()[0] for job in jobs]
        array_id = jobs[0].job_id.split("_")[0]
        print(
            f"Submitted SLURM job array {array_id} ({len(jobs)} jobs); sweep directory {sweep_dir}"
        )
        print(f"  squeue -j {array_id}    # each job writes {sweep_dir}/<job number>/")
        return [
            JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=job.job_id)
            for o, job in zip(job_overrides, jobs)
        ]


def _record(sweep_dir: Path, jobs: list, job_overrides: Sequence[Sequence[str]], nums) -> None:
    """sweep.json: which SLURM job runs which sweep job (appended per batch of the sweeper)."""
    path = sweep_dir / "sweep.json"
    record = json.loads(path.read_text()) if path.exists() else {"jobs": []}
    for job, num, overrides in zip(jobs, nums, job_overrides):
        record["jobs"].append(
            {"num": num, "slurm_job_id": job.job_id, "overrides": list(overrides)}
            | {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
        )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
