"""Log-mel extraction speed and loader throughput (decode, resample, checks, collate)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lmu_asr.bench.measure import Measurement, times


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=16, help="log-mel batch size")
    p.add_argument("--seconds", type=float, default=10.0, help="log-mel utterance length")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--files",
        choices=["generated", "demo"],
        default="generated",
        help="loader data: generated wav files or the demo corpus's train split",
    )
    p.add_argument("--num-files", type=int, default=300, help="generated wav files")
    p.add_argument("--rate", type=int, default=16000, help="sample rate of generated files")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--epochs", type=int, default=3, help="loader epochs (repeats)")
    p.add_argument("--max-frames", type=int, default=20000, help="frames per batch")


def run(args: argparse.Namespace, device: torch.device) -> list[Measurement]:
    from lmu_asr.data import (
        BucketBatchSampler,
        DataConfig,
        SpeechDataset,
        load_split,
        make_loader,
        num_frames,
    )
    from lmu_asr.features import FeatureConfig, LogMel

    frontend = LogMel(FeatureConfig()).to(device)
    wav = torch.randn(args.batch, int(args.seconds * 16000), device=device)
    wav_lens = torch.full((args.batch,), wav.shape[1], device=device)
    with torch.no_grad():
        secs = times(lambda: frontend(wav, wav_lens), args.repeats, device=device)
    audio = args.batch * args.seconds
    threads = torch.get_num_threads()
    mel = Measurement("logmel", "x real time", [audio / s for s in secs],
                      {"batch": f"{args.batch} x {args.seconds:g} s", "threads": threads,
                       "device": device.type})  # fmt: skip
    mel.note = f"{mel.median / threads:.0f}x real time per thread" if device.type == "cpu" else None

    with tempfile.TemporaryDirectory() as tmp:
        if args.files == "demo":
            utts = load_split(DataConfig(), "train")
        else:
            utts = _write_wavs(Path(tmp), args.num_files, args.rate)
        dataset = SpeechDataset(utts, subsampling=4)
        sampler = BucketBatchSampler([num_frames(u.duration) for u in utts], args.max_frames)
        rates = []
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            loader = make_loader(dataset, sampler, args.workers)
            t0, audio_s = time.perf_counter(), 0.0
            for batch in loader:
                audio_s += batch.wav_lens.sum().item() / 16000
            rates.append(audio_s / (time.perf_counter() - t0))
    files = args.files if args.files == "demo" else f"{len(utts)} generated at {args.rate} Hz"
    config = {"files": files, "workers": args.workers, "audio_hours": round(audio_s / 3600, 3)}
    loader_m = Measurement("loader", "audio-s/s", rates, config)
    loader_m.note = "one epoch each, worker start-up included: decode, resample, checks, collate"
    per_worker = Measurement("loader_per_worker", "audio-s/s",
                             [r / max(1, args.workers) for r in rates], config)  # fmt: skip
    return [mel, loader_m, per_worker]


def _write_wavs(folder: Path, count: int, rate: int) -> list:
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
