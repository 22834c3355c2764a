"""Training throughput (audio-seconds per second), achieved FLOP/s of a training step against
the machine's matmul peak measured in the same run, and where a step's time goes.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one whole training step
(forward and backward): matrix products, convolutions and attention. Elementwise work, norms,
the FFT and the optimizer are not counted, so the fraction understates the work done."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from lmu_asr.batching import Batch
from lmu_asr.bench.measure import Measurement, interleaved, matmul
from lmu_asr.distributed import DistEnv
from lmu_asr.features import FeatureConfig
from lmu_asr.model import ModelConfig, SpeechRecognizer
from lmu_asr.optim import OptimConfig, build_optimizer
from lmu_asr.text import VOCAB
from lmu_asr.train import train_step

CONF = Path(__file__).resolve().parents[2] / "conf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["lmu_small", "lmu_base"], help="conf/model")
    p.add_argument("--precision", choices=list(DTYPES), default=None,
                   help="default: fp32 on CPU, bf16 on GPU")  # fmt: skip
    p.add_argument("--batch-seconds", type=float, default=80.0,
                   help="audio per step (the demo's data.max_frames=8000 is 80 s)")  # fmt: skip
    p.add_argument("--utt-seconds", type=float, default=4.0, help="length of each utterance")
    p.add_argument("--chars-per-second", type=float, default=14.0, help="transcript length")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-n", type=int, default=2048, help="matmul size of the peak (GPU: 8192)")
    p.add_argument("--top", type=int, default=8, help="operators listed from the profile")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (not the loop)")


def model_config(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text()))


def synthetic_batch(args: argparse.Namespace, device: torch.device, sample_rate: int = 16000):
    """Noise utterances of `utt_seconds` and random transcripts, `batch_seconds` in all."""
    g = torch.Generator().manual_seed(0)
    B = max(1, round(args.batch_seconds / args.utt_seconds))
    S = int(args.utt_seconds * sample_rate)
    L = max(1, round(args.chars_per_second * args.utt_seconds))
    wav = 0.1 * torch.randn(B, S, generator=g)
    tokens = torch.randint(2, len(VOCAB), (B, L), generator=g)
    batch = Batch(wav, torch.full((B,), S), tokens, torch.full((B,), L), [str(i) for i in range(B)])
    return batch.to(device)


def run(args: argparse.Namespace, device: torch.device) -> list[Measurement]:
    precision = DTYPES[args.precision or ("bf16" if device.type == "cuda" else "fp32")]
    peak_fn, peak_flops = matmul(args.peak_n, device, precision)
    batch = synthetic_batch(args, device)
    audio_s = batch.wav_lens.sum().item() / 16000
    features = FeatureConfig(**yaml.safe_load((CONF / "features" / "default.yaml").read_text()))
    out: list[Measurement] = []
    for name in args.models:
        torch.manual_seed(0)
        model = SpeechRecognizer(model_config(name), features).to(device)
        opt = build_optimizer(model, OptimConfig())
        compiled = torch.compile(model) if args.compile else model
        scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)

        def step(model=compiled, opt=opt, scaler=scaler) -> None:
            train_step(model, [batch], opt, scaler, 5.0, precision, DistEnv())

        with FlopCounterMode(display=False) as counter:  # eager: the compiled graph hides ops
            train_step(model, [batch], opt, scaler, 5.0, precision, DistEnv())
        flops = counter.get_total_flops()
        secs = interleaved({"step": step, "peak": peak_fn}, args.repeats, device=device)
        params = sum(p.numel() for p in model.parameters())
        config = {"model": name, "parameters": params, "precision": str(precision)[6:]}
        config |= {"compiled": True} if args.compile else {}
        config |= {"batch": f"{len(batch)} x {args.utt_seconds:g} s", "device": device.type}
        config |= {"threads": torch.get_num_threads()} if device.type == "cpu" else {}
        step_s = Measurement(f"train_step.{name}", "s", secs["step"], config)
        rate = Measurement(f"train_audio_s_per_s.{name}", "audio-s/s",
                           [audio_s / s for s in secs["step"]], config)  # fmt: skip
        peak_config = {"n": args.peak_n, "dtype": config["precision"], "device": device.type}
        peak = Measurement(f"matmul_peak.{name}", "FLOP/s",
                           [peak_flops / s for s in secs["peak"]], peak_config)  # fmt: skip
        achieved = Measurement(f"train_flops.{name}", "FLOP/s", [flops / s for s in secs["step"]],
                               config | {"flops_per_step": flops})  # fmt: skip
        achieved.baseline = peak.name
        achieved.ratio = achieved.median / peak.median
        achieved.ratio_is = "achieved FLOP/s / matmul peak FLOP/s (medians, interleaved rounds)"
        if name == "lmu_small" and device.type == "cpu":
            achieved.bar, achieved.met = ">= 0.30", achieved.ratio >= 0.30
        achieved.note = "FlopCounterMode: matmuls, convolutions, attention; fwd + bwd"
        out += [step_s, rate, peak, achieved, profile(step, name, config, args.top, device)]
    return out


def profile(step, name: str, config: dict, top: int, device: torch.device) -> Measurement:
    """One profiled step: its time and the operators with the most self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    ops = [f"{_short(e.key)} {100 * getattr(e, key) / total:.1f}%" for e in events[:top]]
    m = Measurement(f"profile.{name}", "s", [total / 1e6], config)
    m.note = ("top operators by self " + ("GPU" if device.type == "cuda" else "CPU")
              + " time (profiled step, slower than unprofiled): " + ", ".join(ops))  # fmt: skip
    return m


def _short(kernel: str) -> str:
    """`void at::native::foo<...>(...)` -> `foo` (CUDA kernel names run to hundreds of chars)."""
    name = kernel.removeprefix("void ").split("<")[0].split("(")[0]
    return name.rsplit("::", 1)[-1] if not name.startswith("aten::") else name
