"""How a SLURM task starts: `python -m lmu_asr.task_start ARGS...` blocks SLURM's time-limit
warning (USR2) and execs `python ARGS...` (a sweep's task: submitit's `-u -m
submitit.core._submit FOLDER`; slurm/train.sbatch: `-u -m lmu_asr.launch ...`), which inherits
the blocked signal. `lmu_asr.preemption.StopFlag` unblocks it once its handler is in place,
so a warning that came while the task was starting is handled then.

Needed because SLURM may send `--signal` up to 60 s earlier than asked (sbatch(1)), so a short
job can be warned at once, and USR2 ends a process that has no handler for it yet: the task
would fail instead of being requeued. Only this module's start (a few ms) is unprotected."""

import os
import signal
import sys

if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
