"""Speaker and channel variety for training, applied on the fly to each training micro-batch:
speed perturbation (resampling, which shifts tempo and pitch / vocal-tract length together),
simulated reverberation (an exponentially decaying noise impulse response) and additive noise
at a random SNR. Every draw comes from the micro-batch's seed, so a resumed run repeats them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import torch
import torchaudio.functional as AF
from torch import Tensor

from lmu_asr.data import Batch
from lmu_asr.features import hop_samples
from lmu_asr.speech_dataset import ctc_frames_needed, encoder_frames

if TYPE_CHECKING:
    from lmu_asr.config import Config


@dataclass
class AugmentConfig:
    """Hydra group `augment`."""

    speeds: list[float] = field(default_factory=lambda: [1.0])  # one drawn per utterance
    reverb_prob: float = 0.0
    rt60_min: float = 0.1  # seconds for the impulse response to decay by 60 dB
    rt60_max: float = 0.5
    noise_prob: float = 0.0
    snr_min: float = 10.0  # dB
    snr_max: float = 30.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"augment.{name}={getattr(self, name)!r}: {why}")

        if not self.speeds or not all(0.5 <= s <= 2.0 for s in self.speeds):
            raise bad("speeds", "needs at least one factor, each in [0.5, 2]")
        for name in ("reverb_prob", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "is a probability: must be in [0, 1]")
        if not 0.0 < self.rt60_min <= self.rt60_max <= 2.0:
            raise bad("rt60_min", f"need 0 < rt60_min <= rt60_max <= 2 (rt60_max={self.rt60_max})")
        if self.snr_min > self.snr_max:
            raise bad("snr_min", f"must be <= snr_max ({self.snr_max})")

    @property
    def enabled(self) -> bool:
        return any(s != 1.0 for s in self.speeds) or self.reverb_prob > 0 or self.noise_prob > 0


def training_augmenter(cfg: Config) -> Callable[..., Batch] | None:
    """(batch, seed=...) -> augmented batch for `cfg`'s training run; None when disabled."""
    if not cfg.augment.enabled:
        return None
    hop = hop_samples(cfg.data.sample_rate, cfg.features.hop_ms)
    return partial(augment_batch, cfg=cfg.augment, sample_rate=cfg.data.sample_rate, hop=hop,
                   subsampling=cfg.model.subsampling)  # fmt: skip


def augment_batch(
    batch: Batch, cfg: AugmentConfig, seed: int, sample_rate: int, hop: int, subsampling: int
) -> Batch:
    """`batch` (on the CPU) with speed, reverberation and noise drawn from `seed`. A speed-up
    that would leave CTC too few encoder frames for an utterance's tokens is not applied."""
    if not cfg.enabled or not len(batch):
        return batch
    g = torch.Generator().manual_seed(seed)
    B = len(batch)
    pick = torch.randint(len(cfg.speeds), (B,), generator=g)
    wavs, lens = [], []
    for b in range(B):
        wav, n = batch.wav[b, : batch.wav_lens[b]], int(batch.wav_lens[b])
        speed = cfg.speeds[int(pick[b])]
        if speed != 1.0:
            available = encoder_frames(math.ceil(n / speed) // hop + 1, subsampling)
            tokens = batch.tokens[b, : batch.token_lens[b]].tolist()
            if available >= ctc_frames_needed(tokens):
                wav = AF.resample(wav, round(100 * speed), 100)
        wavs.append(wav)
        lens.append(wav.numel())
    wav = torch.zeros(B, max(lens))
    for b, w in enumerate(wavs):
        wav[b, : w.numel()] = w
    wav_lens = torch.tensor(lens, dtype=batch.wav_lens.dtype)
    valid = torch.arange(wav.shape[1])[None, :] < wav_lens[:, None]
    wav = _reverb(wav, valid, cfg, g, sample_rate)
    wav = _noise(wav, valid, wav_lens, cfg, g)
    return replace(batch, wav=wav, wav_lens=wav_lens)


def _reverb(wav: Tensor, valid: Tensor, cfg: AugmentConfig, g, sample_rate: int) -> Tensor:
    """Convolve the chosen rows with a decaying-noise room response, keeping their loudness."""
    chosen = torch.rand(len(wav), generator=g) < cfg.reverb_prob
    rt60 = cfg.rt60_min + (cfg.rt60_max - cfg.rt60_min) * torch.rand(len(wav), generator=g)
    length = int(cfg.rt60_max * sample_rate)
    t = torch.arange(length) / sample_rate
    rir = torch.randn(len(wav), length, generator=g) * torch.exp(-6.9 * t / rt60[:, None])
    rir[:, 0] = 1.0  # the direct path
    if not chosen.any():
        return wav
    S = wav.shape[1]
    n = 1 << (S + length - 2).bit_length()  # a power of 2: ~5x faster than AF.fftconvolve's size
    wet = torch.fft.irfft(torch.fft.rfft(wav[chosen], n) * torch.fft.rfft(rir[chosen], n), n)
    wet = wet[:, :S] * valid[chosen]
    rms = wav[chosen].pow(2).sum(1) / wet.pow(2).sum(1).clamp(min=1e-12)
    out = wav.clone()
    out[chosen] = wet * rms.sqrt()[:, None]
    return out


def _noise(wav: Tensor, valid: Tensor, lens: Tensor, cfg: AugmentConfig, g) -> Tensor:
    """Add white noise to the chosen rows at an SNR drawn from [snr_min, snr_max] dB."""
    chosen = torch.rand(len(wav), generator=g) < cfg.noise_prob
    snr = cfg.snr_min + (cfg.snr_max - cfg.snr_min) * torch.rand(len(wav), generator=g)
    noise = torch.randn(wav.shape, generator=g) * valid
    power = wav.pow(2).sum(1) / lens.clamp(min=1)
    scale = (power / 10 ** (snr / 10)).sqrt() * chosen
    return wav + noise * scale[:, None]
