"""Training speed while logging every step: a fixed CPU workload per step (matrix products) with
10 metrics per step, with MLflow off, during an outage (a port where nothing answers) and sending
to a live server (--uri). Modes alternate round by round, so drift in the machine's speed hits
all of them alike."""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmu_asr.bench.measure import Measurement


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", help="a live MLflow server, e.g. http://127.0.0.1:5000")
    p.add_argument("--steps", type=int, default=100, help="steps per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--size", type=int, default=1024, help="matrix size of a step's work")


def run(args: argparse.Namespace, device: torch.device) -> list[Measurement]:
    import mlflow  # noqa: F401  (imported long before any outage in a real job)

    from lmu_asr.tracking import Tracker, TrackingConfig

    x = torch.randn(args.size, args.size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends
    modes = {"off": TrackingConfig(enabled=False), "outage": TrackingConfig(uri=down)}
    if args.uri:
        modes["server"] = TrackingConfig(uri=args.uri, experiment="bench_tracking")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    metrics = {f"train/m{i}": 0.5 for i in range(10)}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode, cfg in modes.items():
                tracker = Tracker(cfg, Path(tmp) / f"{mode}-{r}", rank=0, params={"a": 1})
                t0 = time.perf_counter()
                for step in range(1, args.steps + 1):
                    (x @ x).sum().item()
                    tracker.log(metrics, step)
                rates[mode].append(args.steps / (time.perf_counter() - t0))
                tracker.close()
    config = {"steps_per_round": args.steps, "matrix": args.size, "metrics_per_step": 10}
    out = []
    for mode, values in rates.items():
        m = Measurement(f"tracking.{mode}", "steps/s", values, config)
        if mode != "off":
            m.baseline = "tracking.off"
            m.ratio = m.median / statistics.median(rates["off"])
            m.ratio_is = "steps/s with MLflow " + mode + " / steps/s with MLflow off"
        out.append(m)
    return out
