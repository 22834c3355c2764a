"""Stop requests (Ctrl-C, SIGTERM from a scheduler, SLURM's time-limit/preemption signal).

The handler only records the signal; the training loop polls `requested` after each step, all
ranks agree on it (distributed.any_rank), rank 0 saves a checkpoint, and the job exits (and under
SLURM is requeued). No I/O happens inside the handler."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signum: int | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._signals = signals

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
