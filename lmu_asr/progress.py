"""The live progress line a person follows (step, loss, learning rate, speed and ETA), and the
metrics behind it, system ones included."""

from __future__ import annotations

import logging
import math
import time

import psutil
import torch

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
    out = {"sys/cpu_percent": _PROCESS.cpu_percent(), "sys/rss_gb": _rss_gb()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["sys/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"
