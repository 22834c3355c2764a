"""Benchmarks that print JSON: `python -m lmu_asr.bench {lmu,data,tracking} [--help]`.

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
    import torch

    from lmu_asr.lmu import LMU

    torch.set_num_threads(args.threads)
    B, D_in, H = args.batch, args.hidden, args.hidden
    shape = dict(memory_d=args.memory_d, order=args.order, theta=args.theta)
    torch.manual_seed(0)
    fft = LMU(D_in, H, **shape, parallel=True)
    rec = LMU(D_in, H, **shape, parallel=False)
    rec.load_state_dict(fft.state_dict())  # same weights, same function
    lstm = torch.nn.LSTM(D_in, H, batch_first=True)

    def fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> None:
        module.zero_grad(set_to_none=True)
        module(x)[0].sum().backward()

    def shared(x: torch.Tensor, m: torch.Tensor) -> None:
        # the work both LMU paths do besides the memory: u and h projections, tanh
        fft.zero_grad(set_to_none=True)
        u, h = fft.W_u(x), torch.tanh(fft.W_m(m) + fft.W_x(x))
        (u.sum() + h.sum()).backward()

    rows = []
    for T in args.T:
        x = torch.randn(B, T, D_in)
        m = torch.randn(B, T, args.memory_d * args.order, requires_grad=True)
        slow = args.long_repeats if T > 1000 else args.repeats  # recurrent, LSTM: O(T) steps
        row = {
            "T": T,
            "fft_s": median_time(lambda x=x: fwd_bwd(fft, x), args.repeats),
            "recurrent_s": median_time(lambda x=x: fwd_bwd(rec, x), slow),
            "lstm_s": median_time(lambda x=x: fwd_bwd(lstm, x), slow),
            "shared_projections_s": median_time(lambda x=x, m=m: shared(x, m), args.repeats),
        }
        row["lstm_over_fft"] = row["lstm_s"] / row["fft_s"]
        row["recurrent_over_fft"] = row["recurrent_s"] / row["fft_s"]
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})

    config = dict(batch=B, input_size=D_in, hidden_size=H, **shape, threads=args.threads)
    config.update(repeats=args.repeats, long_repeats=args.long_repeats, torch=torch.__version__)
    out = {
        "what": "forward+backward seconds (median), LMU FFT path vs recurrent path vs nn.LSTM",
        "config": config,
        "note": "shared_projections_s: W_u, W_x, W_m and tanh alone, paid by both LMU paths",
        "results": rows,
    }
    if 1000 in args.T:
        r = rows[args.T.index(1000)]
        out["bar_T1000"] = {
            "lstm_over_fft>=1.5": r["lstm_over_fft"] >= 1.5,
            "recurrent_over_fft>=5": r["recurrent_over_fft"] >= 5,
        }
    return out


# --- data ------------------------------------------------------------------------------------


def bench_data(args: argparse.Namespace) -> dict:
    import tempfile
    from pathlib import Path

    import torch

    from lmu_asr.data import (
        BucketBatchSampler,
        DataConfig,
        SkipCounter,
        SpeechDataset,
        load_split,
        make_loader,
        num_frames,
    )
    from lmu_asr.features import FeatureConfig, LogMel

    torch.set_num_threads(args.threads)
    frontend = LogMel(FeatureConfig())
    wav = torch.randn(args.batch, int(args.seconds * 16000))
    wav_lens = torch.full((args.batch,), wav.shape[1])
    with torch.no_grad():
        t_mel = median_time(lambda: frontend(wav, wav_lens), args.repeats)
    realtime = args.batch * args.seconds / t_mel
    result = {
        "logmel": {
            "threads": torch.get_num_threads(),
            "batch": f"{args.batch} x {args.seconds} s",
            "seconds_per_batch": round(t_mel, 5),
            "x_realtime": round(realtime),
            "x_realtime_per_thread": round(realtime / args.threads),
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.files == "demo":
            utts = load_split(DataConfig(), "train")
        else:
            utts = _write_wavs(Path(tmp), args.num_files, args.rate)
        dataset = SpeechDataset(utts, subsampling=4)
        sampler = BucketBatchSampler([num_frames(u.duration) for u in utts], args.max_frames)
        loader = make_loader(dataset, sampler, args.workers)
        t0 = time.perf_counter()
        n_utts = audio_s = 0
        skipped = SkipCounter()
        for batch in loader:
            skipped.add(batch)
            n_utts += len(batch)
            audio_s += batch.wav_lens.sum().item() / 16000
        elapsed = time.perf_counter() - t0
    result["loader"] = {
        "files": args.files if args.files == "demo" else f"generated at {args.rate} Hz",
        "workers": args.workers,
        "utterances": n_utts,
        "audio_hours": round(audio_s / 3600, 3),
        "batches": len(sampler),
        "seconds": round(elapsed, 3),
        "utterances_per_s": round(n_utts / elapsed, 1),
        "audio_s_per_s": round(audio_s / elapsed, 1),
        "skipped": skipped.summary(),
        "note": "one epoch incl. worker start-up: decode, resample to 16 kHz, checks, collate",
    }
    return result


def _write_wavs(folder, count: int, rate: int) -> list:
    """`count` wav files of 1-8 s (tones in noise) at `rate` Hz with a short transcript each."""
    import numpy as np
    import soundfile

    from lmu_asr.data import Utterance

    rng = np.random.default_rng(0)
    utts = []
    for i in range(count):
        seconds = rng.uniform(1.0, 8.0)
        t = np.arange(int(seconds * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)
        wav = tone + 0.05 * rng.standard_normal(len(t))
        path = folder / f"utt{i:05d}.wav"
        soundfile.write(path, wav.astype(np.float32), rate, subtype="PCM_16")
        utts.append(Utterance(f"utt{i:05d}", str(path), "a short test sentence", len(t) / rate))
    return utts


# --- tracking --------------------------------------------------------------------------------


def bench_tracking(args: argparse.Namespace) -> dict:
    """Training speed while logging every step: a fixed CPU workload per step (matrix products)
    with ~10 metrics per step, MLflow off, sending to a live server (--uri), and during an
    outage (a port where nothing answers). Modes alternate round by round, so drift in the
    machine's speed hits all of them alike."""
    import socket
    import tempfile
    from pathlib import Path

    import mlflow  # noqa: F401  (imported long before any outage in a real job)
    import torch

    from lmu_asr.tracking import Tracker, TrackingConfig

    torch.set_num_threads(args.threads)
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
    median = {m: statistics.median(v) for m, v in rates.items()}
    out = {"steps_per_s": median, "rounds": rates}
    out |= {f"{m}/off": median[m] / median["off"] for m in modes if m != "off"}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmu_asr.bench", description=__doc__)
    sub = parser.add_subparsers(dest="which", required=True)
    p_lmu = sub.add_parser("lmu", help="LMU FFT vs recurrent vs nn.LSTM, forward+backward")
    p_lmu.add_argument("--T", type=int, nargs="+", default=[250, 1000, 4000], help="lengths")
    p_lmu.add_argument("--repeats", type=int, default=5)
    p_lmu.add_argument(
        "--long-repeats", type=int, default=3, help="repeats of recurrent and LSTM for T > 1000"
    )
    p_lmu.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p_lmu.add_argument("--batch", type=int, default=16)
    p_lmu.add_argument("--hidden", type=int, default=512, help="input size = hidden size")
    p_lmu.add_argument("--memory-d", type=int, default=1)
    p_lmu.add_argument("--order", type=int, default=256)
    p_lmu.add_argument("--theta", type=float, default=1000.0)
    p_lmu.set_defaults(fn=bench_lmu)
    p_data = sub.add_parser("data", help="log-mel extraction speed and loader throughput")
    p_data.add_argument("--threads", type=int, default=1, help="torch threads for log-mel")
    p_data.add_argument("--batch", type=int, default=16, help="log-mel batch size")
    p_data.add_argument("--seconds", type=float, default=10.0, help="log-mel utterance length")
    p_data.add_argument("--repeats", type=int, default=10)
    p_data.add_argument(
        "--files",
        choices=["generated", "demo"],
        default="generated",
        help="loader data: generated wav files or the demo corpus train split",
    )
    p_data.add_argument("--num-files", type=int, default=300, help="generated wav files")
    p_data.add_argument("--rate", type=int, default=16000, help="sample rate of generated files")
    p_data.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p_data.add_argument("--max-frames", type=int, default=20000, help="frames per batch")
    p_data.set_defaults(fn=bench_data)
    p_track = sub.add_parser("tracking", help="training speed: MLflow off, up (--uri), down")
    p_track.add_argument("--uri", help="a live MLflow server, e.g. http://127.0.0.1:5000")
    p_track.add_argument("--steps", type=int, default=100, help="steps per round")
    p_track.add_argument("--rounds", type=int, default=6)
    p_track.add_argument("--size", type=int, default=1024, help="matrix size of a step's work")
    p_track.add_argument("--threads", type=int, default=1)
    p_track.set_defaults(fn=bench_tracking)
    args = parser.parse_args(argv)
    print(json.dumps(args.fn(args), indent=2))


if __name__ == "__main__":
    main()
