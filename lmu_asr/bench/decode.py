"""Offline real-time factor of greedy and beam decoding, and the per-frame cost of the recurrent
LMU state update (what streaming recognition runs every 40 ms frame)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from lmu_asr.bench.measure import Measurement, times
from lmu_asr.bench.train import CONF, model_config
from lmu_asr.decode import BeamConfig, BeamSearchDecoder, greedy_decode
from lmu_asr.features import FeatureConfig
from lmu_asr.model import SpeechRecognizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lmu_small", help="conf/model preset (random weights)")
    p.add_argument("--checkpoint", type=Path, help="a run directory or step folder instead")
    p.add_argument("--manifest", type=Path,
                   help="real audio: the first --utts utterances of this JSON-lines manifest "
                   "(default: noise of --utt-seconds)")  # fmt: skip
    p.add_argument("--utts", type=int, default=16)
    p.add_argument("--utt-seconds", type=float, default=4.0)
    p.add_argument("--beam-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frames", type=int, default=400, help="streamed frames per repeat")
    p.add_argument("--stream-models", nargs="+", default=["lmu_small", "lmu_base"])


def run(args: argparse.Namespace, device: torch.device) -> list[Measurement]:
    if args.checkpoint:
        from lmu_asr.evaluate import load_model, resolve_checkpoint

        model, _ = load_model(resolve_checkpoint(args.checkpoint), device)
        which = str(args.checkpoint)
    else:
        features = FeatureConfig(**yaml.safe_load((CONF / "features" / "default.yaml").read_text()))
        model = SpeechRecognizer(model_config(args.model), features).to(device).eval()
        which = f"{args.model}, random weights"
    wav, lens = _audio(args)
    wav, lens = wav.to(device), lens.to(device)
    audio_s = lens.sum().item() / 16000
    with torch.no_grad():
        log_probs, out_lens = model(wav, lens)
    beam = BeamSearchDecoder(BeamConfig(beam_size=args.beam_size))
    what = str(args.manifest) if args.manifest else f"noise, {args.utt_seconds:g} s each"
    config = {"model": which, "audio": f"{len(lens)} utterances ({what}), {audio_s:.0f} s"}
    config |= {"device": device.type, "threads": torch.get_num_threads()}

    @torch.no_grad()
    def forward() -> None:
        model(wav, lens)

    out = [Measurement("rtf.encoder", "x", [s / audio_s for s in times(forward, args.repeats)],
                       config, note="encoder forward alone, seconds per audio-second")]  # fmt: skip
    for name, decode in [("greedy", greedy_decode), (f"beam{args.beam_size}", beam)]:
        secs = times(lambda d=decode: d(log_probs, out_lens), args.repeats, device=device)
        rtf = [(s + out[0].median * audio_s) / audio_s for s in secs]
        m = Measurement(f"rtf.{name}", "x", rtf, config | {"decoder": name})
        m.baseline, m.ratio = "rtf.encoder", m.median / out[0].median
        m.ratio_is = "(encoder + decoder) / encoder alone"
        m.note = "real-time factor: seconds to recognise one second of audio (< 1: faster)"
        if not args.checkpoint and name != "greedy":
            m.note += "; untrained model: near-uniform posteriors, the beam search's worst case"
        out.append(m)
    out += [_lmu_step(name, args.frames, args.repeats, device) for name in args.stream_models]
    return out


def _audio(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) waveforms at 16 kHz, right-padded, and their lengths."""
    if args.manifest:
        from lmu_asr.data import read_manifest
        from lmu_asr.speech_dataset import read_audio

        waves = [read_audio(u.audio) for u in read_manifest(args.manifest)[: args.utts]]
    else:
        g = torch.Generator().manual_seed(0)
        waves = [0.1 * torch.randn(int(args.utt_seconds * 16000), generator=g)] * args.utts
    lens = torch.tensor([len(w) for w in waves])
    return torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), lens


def _lmu_step(name: str, frames: int, repeats: int, device: torch.device) -> Measurement:
    """Per-frame cost of all of a model's LMU layers stepping one frame (batch 1)."""
    cfg = model_config(name)
    model = SpeechRecognizer(cfg, FeatureConfig()).to(device).eval()
    lmus = [block.lmu for block in model.encoder.blocks]
    x = torch.randn(frames, 1, cfg.d_model, device=device)

    @torch.no_grad()
    def stream() -> None:
        states = [None] * len(lmus)
        for x_t in x:
            for i, lmu in enumerate(lmus):
                _, states[i] = lmu.step(x_t, states[i])

    per_frame = [s / frames for s in times(stream, repeats, device=device)]
    frame_s = FeatureConfig().hop_ms * cfg.subsampling / 1000
    config = {"model": name, "layers": cfg.n_layers, "d_model": cfg.d_model}
    config |= {"memory": f"{cfg.memory_d} x {cfg.order}", "batch": 1, "device": device.type}
    m = Measurement(f"lmu_step.{name}", "s/frame", per_frame, config)
    m.baseline, m.ratio = f"frame period {frame_s * 1000:g} ms", frame_s / m.median
    m.ratio_is = "frame period / cost: how many times faster than real time"
    m.note = "LMU.step of every layer for one encoder frame (attention and feed-forward not incl.)"
    return m
