"""One measurement record, and timing with repeats (CUDA-synchronised where it matters)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Measurement:
    """A named quantity measured `len(values)` times. `ratio` compares it with the measurement
    named `baseline` (taken in the same run), as `ratio_is` says; `bar` is a target, `met` whether
    the median reaches it."""

    name: str
    unit: str
    values: list[float]
    config: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    ratio: float | None = None
    ratio_is: str | None = None
    bar: str | None = None
    met: bool | None = None
    note: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def record(self, group: str) -> dict[str, Any]:
        """The JSON object printed for this measurement."""
        out = {"group": group, "name": self.name, "config": self.config}
        out |= {"median": _round(self.median), "min": _round(min(self.values))}
        out |= {"max": _round(max(self.values)), "repeats": len(self.values), "unit": self.unit}
        for key in ("baseline", "ratio", "ratio_is", "bar", "met", "note"):
            value = getattr(self, key)
            if value is not None:
                out[key] = _round(value) if isinstance(value, float) else value
        return out


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def sync(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def times(
    fn: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> list[float]:
    """Wall seconds of `fn()` for each of `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:  # fmt: skip
    """Like `times` for several functions, alternating them round by round, so drift in the
    machine's speed hits all of them alike (the ratios between them stay honest)."""
    for fn in fns.values():
        times(fn, 0, warmup, device)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name] += times(fn, 1, 0, device)
    return out


def matmul(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], None], int]:
    """An n x n x n matrix product in `dtype` and its FLOPs: the machine's matmul peak, the
    baseline that achieved FLOP/s are compared with. On a GPU one call runs 20 products (one
    alone is too short to time)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 1 if device.type == "cpu" else 20

    def run() -> None:
        for _ in range(inner):
            a @ b

    return run, 2 * n**3 * inner
