"""Benchmarks that print JSON: `python -m lmu_asr.bench {lmu,data} [--help]`.

Numbers on a shared machine are noisy; compare the ratios, which are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- lmu -------------------------------------------------------------------------------------


def bench_lmu(args: argparse.Namespace) -> dict:
    raise NotImplementedError


# --- data ------------------------------------------------------------------------------------


def bench_data(args: argparse.Namespace) -> dict:
    raise NotImplementedError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmu_asr.bench", description=__doc__)
    sub = parser.add_subparsers(dest="which", required=True)
    p_lmu = sub.add_parser("lmu", help="LMU FFT vs recurrent vs nn.LSTM, forward+backward")
    p_lmu.set_defaults(fn=bench_lmu)
    p_data = sub.add_parser("data", help="log-mel extraction speed and loader throughput")
    p_data.set_defaults(fn=bench_data)
    args = parser.parse_args(argv)
    print(json.dumps(args.fn(args), indent=2))


if __name__ == "__main__":
    main()
