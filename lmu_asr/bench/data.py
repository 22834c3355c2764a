"""Log-mel extraction speed and loader throughput (decode, resample, checks, collate), from
wav files or from prepared shards (`--files prepared`: what `data=prepared` reads, with the
loader's peak memory)."""

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
        choices=["generated", "demo", "prepared"],
        default="generated",
        help="loader data: generated wav files, the demo corpus's train split, or prepared "
        "shards (--prepared-dir, else the generated files prepared into a temporary folder)",
    )
    p.add_argument("--prepared-dir", type=Path, help="a folder made by python -m lmu_asr.prepare")
    p.add_argument("--cache-groups", type=int, default=8, help="data.cache_groups (prepared)")
    p.add_argument("--num-files", type=int, default=300, help="generated wav files")
    p.add_argument("--rate", type=int, default=16000, help="sample rate of generated files")
    p.add_argument("--format", choices=["wav", "flac"], default="wav", help="of generated files")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--epochs", type=int, default=3, help="timed loader epochs, after one untimed")
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
    from lmu_asr.prepared import PreparedSplit

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
        shards, files = None, f"{args.num_files} {args.format} generated at {args.rate} Hz"
        prepared = None
        if args.files == "demo":
            utts, files = load_split(DataConfig(), "train"), "demo"
        elif args.files == "prepared":
            folder = args.prepared_dir
            if folder is None:
                folder, prepared = _prepare_generated(Path(tmp), args)
            utts = PreparedSplit(folder, "train", args.cache_groups)
            shards, lengths = utts.shards, [num_frames(d) for d in utts.durations]
            files = f"prepared {folder}" if args.prepared_dir else f"{files}, prepared"
        else:
            utts = _write_wavs(Path(tmp), args.num_files, args.rate, args.format)
        if shards is None:
            lengths = [num_frames(u.duration) for u in utts]
        dataset = SpeechDataset(utts, subsampling=4)
        sampler = BucketBatchSampler(lengths, args.max_frames, shards=shards)
        loader = make_loader(dataset, sampler, args.workers)  # workers start once, as in training
        rates, peaks = [], []
        for epoch in range(args.epochs + 2):  # 0 starts the workers, untimed; the last: memory
            sampler.set_epoch(epoch)
            t0, audio_s, peak = time.perf_counter(), 0.0, 0
            for batch in loader:
                audio_s += batch.wav_lens.sum().item() / 16000
                if epoch > args.epochs:  # PSS is slow to read: not in a timed epoch
                    peak = max(peak, _pss_with_workers())
            if 0 < epoch <= args.epochs:
                rates.append(audio_s / (time.perf_counter() - t0))
        peaks.append(peak / 2**20)
        del loader  # its workers with it
    config = {"files": files, "workers": args.workers, "audio_hours": round(audio_s / 3600, 3)}
    loader_m = Measurement("loader", "audio-s/s", rates, config)
    loader_m.note = "an epoch each, workers started: decode, resample, checks, collate"
    per_worker = Measurement("loader_per_worker", "audio-s/s",
                             [r / max(1, args.workers) for r in rates], config)  # fmt: skip
    pss = Measurement("loader_peak_pss", "MiB", peaks, config)
    pss.note = "this process and its data workers (proportional set size: shared pages split)"
    return [mel, *([prepared] if prepared else []), loader_m, per_worker, pss]


def _pss_with_workers() -> int:
    """Proportional resident bytes of this process and its children (the data workers)."""
    import psutil

    me = psutil.Process()
    return sum(p.memory_full_info().pss for p in [me, *me.children(recursive=True)])


def _prepare_generated(folder: Path, args: argparse.Namespace) -> tuple[Path, Measurement]:
    """The generated files as a GigaSpeech-schema parquet source, prepared into shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmu_asr.prepare import prepare

    utts = _write_wavs(folder, args.num_files, args.rate, args.format)
    rows = {
        "segment_id": [u.id for u in utts],
        "text": [u.text.upper() for u in utts],
        "audio": [{"bytes": Path(u.audio).read_bytes(), "path": u.audio} for u in utts],
        "begin_time": [0.0] * len(utts),
        "end_time": [u.duration for u in utts],
    }
    (folder / "source").mkdir()
    pq.write_table(pa.table(rows), folder / "source" / "train-00000-of-00001.parquet")
    t0 = time.perf_counter()
    info = prepare(
        "xs", folder / "prepared", source=str(folder / "source"), splits=("train",), shard_mb=16
    )
    seconds = time.perf_counter() - t0
    split = info["splits"]["train"]
    mb = sum(s["bytes"] for s in split["shards"]) / 1e6
    config = {"files": f"{args.num_files} {args.format} generated at {args.rate} Hz"}
    done = Measurement("prepare", "audio-s/s", [split["hours"] * 3600 / seconds], config)
    done.note = f"{mb / seconds:.0f} MB/s of shards written, one process, local disk"
    return folder / "prepared", done


def _write_wavs(folder: Path, count: int, rate: int, fmt: str = "wav") -> list:
    """`count` audio files (wav or flac) of 1-8 s, tones in noise at `rate` Hz, each with a short
    transcript."""
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
        path = folder / f"utt{i:05d}.{fmt}"
        soundfile.write(path, wav.astype(np.float32), rate, subtype="PCM_16")
        utts.append(Utterance(f"utt{i:05d}", str(path), "a short test sentence", len(t) / rate))
    return utts
