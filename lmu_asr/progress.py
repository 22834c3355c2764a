"""The live progress line a person follows (step, loss, learning rate, speed and ETA), and the
metrics behind it, system ones included."""

from __future__ import annotations

import logging
import math
import os
import sys
import time

import psutil
from tqdm import tqdm

log = logging.getLogger("lmu_asr")


class Progress:
    """Training metrics since the last report. `report()` logs one line and returns the metrics
    for the tracker."""

    def __init__(self, max_steps: int, budget_s: float, world_size: int = 1):
        self.max_steps, self.budget_s, self.world_size = max_steps, budget_s, world_size
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.audio_s, self.wait_s, self.t0 = 0.0, 0.0, time.monotonic()

    def add(self, loss: float, audio_s: float) -> None:
        self.losses.append(loss)
        self.audio_s += audio_s

    def waited(self, seconds: float) -> None:
        """Time the step loop spent waiting for its batches."""
        self.wait_s += seconds

    def report(self, step: int, epoch: int, elapsed_s: float, lr: float, gnorm: float) -> dict:
        finite = [x for x in self.losses if math.isfinite(x)]
        loss = sum(finite) / len(finite) if finite else math.nan  # not 0: all were skipped
        seconds = max(time.monotonic() - self.t0, 1e-9)
        speed = self.audio_s * self.world_size / seconds  # ranks see equal shares
        eta = min((self.max_steps - step) * seconds / max(len(self.losses), 1),
                  self.budget_s - elapsed_s)  # fmt: skip
        log.info(
            "step %d/%d | loss %.3f | lr %.2e | grad %.2f | %.0f audio-s/s | eta %s",
            *(step, self.max_steps, loss, lr, gnorm, speed, format_duration(eta)),
        )
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": gnorm}
        metrics |= {"train/audio_s_per_s": speed, "train/data_wait": self.wait_s / seconds}
        metrics |= {"train/epoch": epoch} | system_metrics()
        self._reset()
        return metrics


_PROCESS = psutil.Process()  # cpu_percent() measures from the previous call on this object


def _rss_gb() -> float:
    return _PROCESS.memory_info().rss / 2**30


def system_metrics() -> dict[str, float]:
    """This process: CPU use (100 = one core busy since the last call), resident memory, and
    the most GPU memory allocated so far."""
    import torch  # here: the corpus builder shows progress without importing torch

    out = {"sys/cpu_percent": _PROCESS.cpu_percent(), "sys/rss_gb": _rss_gb()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["sys/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class LoopProgress:
    """Progress of a loop of known length (corpus build, decoding), for whoever reads stderr: on a
    terminal tqdm's one redrawn line; in a file or a pipe (SLURM job logs, `tee`) a plain line
    every `every_pct` % of the work or every `every_s` seconds, and one at the end, instead of
    tqdm's many carriage-return redraws that pile up in a log file."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True,
                 stream=None, every_pct: float = 10.0, every_s: float = 60.0) -> None:  # fmt: skip
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.every, self.every_s = max(1, math.ceil(total * every_pct / 100)), every_s
        self.t0 = self.last_t = time.monotonic()
        self.last_n = 0
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled and _is_terminal(self.stream):
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        step_crossed = self.done // self.every > self.last_n // self.every
        due = step_crossed or now - self.last_t >= self.every_s or self.done >= self.total
        if self.enabled and due:
            self.last_t, self.last_n = now, self.done
            seconds = now - self.t0
            eta = (self.total - self.done) * seconds / self.done
            print(
                f"{self.desc}: {self.done}/{self.total} {self.unit} "
                f"({100 * self.done / self.total:.0f}%) in {format_duration(seconds)}, "
                f"eta {format_duration(eta)}",
                file=self.stream,
                flush=True,
            )

    def __enter__(self) -> LoopProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class RunLogFile(logging.FileHandler):
    """The job's `train.log` (hydra.job_logging.handlers.file): a run directory that cannot be
    written ends the job with one line saying so, before anything runs, instead of a logging
    traceback from inside Hydra."""

    def __init__(self, filename: str, *args, **kwargs) -> None:
        try:
            super().__init__(filename, *args, **kwargs)
        except OSError as e:
            folder = os.path.dirname(os.path.abspath(filename))
            raise SystemExit(
                f"error: cannot write {filename} ({e.strerror}): the run directory {folder} is "
                "not writable; nothing in it was changed. Make it writable, or pass "
                "hydra.run.dir=<a writable folder> (a new run there starts from step 0)"
            ) from None
