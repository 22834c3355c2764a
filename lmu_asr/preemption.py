"""Stop requests and restarts: Ctrl-C, SIGTERM, SLURM's time-limit / preemption signal.

The handler only records the signal; the training loop polls it after every optimizer step, all
ranks agree on it, rank 0 saves a checkpoint, and then asks why (`stop_reason`): at SLURM's time
limit or at a preemption, rank 0 requeues the job itself (`requeue`), so that it comes back in the
same run directory however it was submitted (hydra-submitit-launcher or plain sbatch). submitit's
own USR2 handler, which would requeue from inside the handler, is replaced while training runs.

`Lifecycle` keeps `lifecycle.jsonl` in the run directory: a line when a job starts and one when it
stops, with the reason. A start with no stop after it was a node failure, the OOM killer or
`kill -9`; the next start says so."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

REQUEUE_REASONS = ("time_limit", "preemption")  # stops after which rank 0 requeues the job


class StopFlag:
    """Records the first of `signals` while the block runs. Those in `ignore_after` are ignored
    from its end to the end of the process: SLURM's time-limit warning that comes once training is
    over would otherwise reach submitit's handler (which requeues a finished job) or, once Python
    has reset handlers on its way out, end the process (FAILED). SIG_IGN is process-wide and
    outlives Python's shutdown; blocking, per thread, would miss the threads torch started."""

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
        ignore_after: tuple[signal.Signals, ...] = (),
    ):
        self.signum: int | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._signals = signals
        self._ignore_after = set(ignore_after)

    def __enter__(self) -> StopFlag:
        if _on_main_thread():  # only there can Python set handlers
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
            # one held pending since the process started (lmu_asr.task_start) is delivered now,
            # to the handler above
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signals)
        return self

    def __exit__(self, *exc: object) -> None:
        if not _on_main_thread():
            return  # nothing was installed, nothing can be ignored
        for s in self._previous.keys() | self._ignore_after:
            signal.signal(s, signal.SIG_IGN if s in self._ignore_after else self._previous[s])
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def expect_termination(self) -> None:
        """SLURM is about to end this process (a requeue): from the end of the block on, SIGTERM
        is ignored, and the process finishes on its own instead of dying half-way through its
        exit."""
        self._ignore_after.add(signal.SIGTERM)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def parse_signal(name: str) -> signal.Signals:
    """ "USR2", "SIGUSR2" or "12" -> signal.SIGUSR2; ValueError naming the value otherwise."""
    key = name.strip().upper().removeprefix("SIG")
    try:
        return signal.Signals(int(key)) if key.isdigit() else signal.Signals[f"SIG{key}"]
    except (KeyError, ValueError):
        raise ValueError(f"not a signal name or number: {name!r}") from None


def restart_count() -> int:
    """How often SLURM has requeued this job (0 outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def _slurm_job() -> dict[str, str]:
    """`scontrol show job` of this job as {field: value}; {} outside SLURM or on no answer."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return {}
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                             text=True, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def stop_reason(signum: int, stop_signal: int) -> str:
    """Why the job was asked to stop, from the signal and what SLURM says about the job:
    time_limit / preemption (the stop signal, at the time limit or when preempted: SLURM then
    sets PreemptTime), requeue (SIGTERM from `scontrol requeue`, or a preemption's grace period
    ending: SLURM has counted the restart already), cancelled (SIGTERM from scancel),
    interrupted (Ctrl-C), terminated (SIGTERM outside SLURM) or signal <NAME>."""
    if signum == signal.SIGINT:
        return "interrupted"
    job = _slurm_job() if "SLURM_JOB_ID" in os.environ else None
    if job is not None and signum == stop_signal:
        return "time_limit" if job.get("PreemptTime", "None") == "None" else "preemption"
    if job is not None and signum == signal.SIGTERM:
        return "requeue" if int(job.get("Restarts", 0)) > restart_count() else "cancelled"
    if signum == signal.SIGTERM:
        return "terminated"
    return f"signal {signal.Signals(signum).name}"


def comes_back(reason: str, max_restarts: int) -> bool:
    """Whether a job that stopped for `reason` will be requeued: by rank 0 (`requeue`) or, for
    `scontrol requeue`, by SLURM itself."""
    within = restart_count() < max_restarts
    return reason in (*REQUEUE_REASONS, "requeue") and "SLURM_JOB_ID" in os.environ and within


def requeue(reason: str, max_restarts: int) -> bool:
    """After a stop for `reason`, put this SLURM job back in the queue (same job id, same run
    directory) unless it has been restarted `max_restarts` times already. True if requeued."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if reason not in REQUEUE_REASONS or not job_id:
        return False
    if restart_count() >= max_restarts:
        log.warning("not requeued: restart limit reached (trainer.max_restarts=%d)", max_restarts)
        return False
    # an array task is requeued by its own job id (SLURM_JOB_ID), not the array's
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, (out.stderr or out.stdout).strip())
        return False
    log.info("requeued SLURM job %s (%s)", job_id, reason)
    return True


def after_stop(reason: str, max_restarts: int, stop: StopFlag, is_main: bool) -> bool:
    """Once the job has stopped for `reason` (rank 0's) and everything is saved and closed:
    rank 0 requeues it after a time limit or preemption. Under SLURM, whatever the reason, the
    job is ending: SIGTERM is expected from now on and ignored. True if this process requeued."""
    if "SLURM_JOB_ID" in os.environ:
        stop.expect_termination()
    if not is_main:
        return False
    requeued = requeue(reason, max_restarts)
    if not requeued and reason != "requeue":
        log.info("run the same command again to resume")
    return requeued


class Lifecycle:
    """`run_dir/lifecycle.jsonl`: {"event": "start" | "stop", ...}, written by rank 0 (and by
    whichever rank fails, with its error)."""

    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.path = Path(run_dir) / "lifecycle.jsonl"
        self.is_main = is_main

    def events(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip().endswith("}")]

    def _write(self, event: dict) -> None:
        event = {"time": round(time.time(), 3)} | event
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def started(self, step: int) -> None:
        """Log and record this start; a previous start without a stop is recorded as lost."""
        if not self.is_main:
            return
        events = self.events()
        if events and events[-1]["event"] == "start":
            last = events[-1]
            log.warning(
                "the previous start (SLURM job %s, restart %s, on %s) ended without stopping: "
                "node failure, out of memory or kill -9; resuming from step %d",
                *(last.get("slurm_job_id"), last.get("restart"), last.get("host"), step),
            )
            self._write({"event": "stop", "reason": "lost", "step": None, "resumed_from": step})
        where = {"host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        if array := os.environ.get("SLURM_ARRAY_JOB_ID"):  # the id sacct and squeue show
            where["slurm_array_id"] = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
        where |= {"restart": restart_count()}
        self._write({"event": "start", "step": step} | where)
        job = where.get("slurm_array_id") or where["slurm_job_id"]
        log.info(
            "start %d (%s, host %s) at step %d",
            sum(e["event"] == "start" for e in events) + 1,
            f"SLURM job {job}, restart {where['restart']}" if job else "not under SLURM",
            *(where["host"], step),
        )

    def stopped(self, reason: str, step: int | None, error: str = "") -> None:
        if self.is_main:
            log.info("stop at step %s: %s%s", step, reason, f" ({error})" if error else "")
            extra = {"error": error} if error else {}
            self._write({"event": "stop", "reason": reason, "step": step} | extra)

    def summary(self) -> dict:
        """For results.json: how many starts, and every stop before the last one."""
        events = self.events()
        stops = [e for e in events if e["event"] == "stop"]
        return {"starts": sum(e["event"] == "start" for e in events), "stops": stops}
