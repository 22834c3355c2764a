"""Log-mel frontend and SpecAugment. Both run on the device of their input, inside the model, so
evaluation and streaming use the same features (and normalisation statistics) as training."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio
from torch import Tensor, nn

NORMALIZE = ("global", "utterance", "none")


@dataclass
class FeatureConfig:
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    normalize: str = "global"  # global (mean/std buffers) | utterance | none
    # SpecAugment (training only)
    freq_masks: int = 2
    freq_width: int = 27  # mel bins, at most
    time_masks: int = 2
    time_width: float = 0.05  # fraction of each utterance's frames, at most

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"features.{name}={getattr(self, name)!r}: {why}")

        if self.n_mels <= 0:
            raise bad("n_mels", "must be > 0")
        if self.hop_ms <= 0 or self.win_ms < self.hop_ms:
            raise bad("win_ms", f"need win_ms >= hop_ms > 0 (hop_ms={self.hop_ms})")
        if self.normalize not in NORMALIZE:
            raise bad("normalize", f"must be one of {NORMALIZE}")
        for name in ("freq_masks", "time_masks"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not 0 <= self.freq_width <= self.n_mels:
            raise bad("freq_width", f"must be in [0, n_mels={self.n_mels}]")
        if not 0.0 <= self.time_width <= 1.0:
            raise bad("time_width", "is a fraction of the utterance: must be in [0, 1]")


def valid_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, T) bool, True on the first lengths[b] frames."""
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


def num_frames(seconds: float | np.ndarray, hop_ms: float = 10.0) -> int | np.ndarray:
    """Feature frames of `seconds` of audio, a number or an array (centred: samples // hop + 1)."""
    if isinstance(seconds, np.ndarray):
        return (seconds * 1000 / hop_ms).astype(np.int64) + 1
    return int(seconds * 1000 / hop_ms) + 1


def hop_samples(sample_rate: int, hop_ms: float) -> int:
    """Samples per feature frame: a waveform of S samples has S // hop + 1 frames."""
    return round(sample_rate * hop_ms / 1000)


class LogMel(nn.Module):
    """(B, S) waveforms -> (B, T, n_mels) log-mel features, T = S // hop + 1, zero past each
    utterance's frames. Computed in float32 even under autocast."""

    def __init__(self, cfg: FeatureConfig, sample_rate: int = 16000) -> None:
        super().__init__()
        self.cfg = cfg
        self.hop = hop_samples(sample_rate, cfg.hop_ms)
        win = round(sample_rate * cfg.win_ms / 1000)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate,
            n_fft=1 << (win - 1).bit_length(),
            win_length=win,
            hop_length=self.hop,
            n_mels=cfg.n_mels,
            pad_mode="constant",  # zero padding: a padded batch equals each utterance alone
        )
        # Global statistics live in the state_dict, so every user of a checkpoint shares them.
        self.register_buffer("mean", torch.zeros(cfg.n_mels))
        self.register_buffer("std", torch.ones(cfg.n_mels))

    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(
                f"stats must have shape ({self.cfg.n_mels},), got "
                f"{tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if not (std > 0).all():
            raise ValueError("std must be > 0 in every mel bin")
        self.mean.copy_(mean)
        self.std.copy_(std)

    def lengths(self, wav_lens: Tensor) -> Tensor:
        return wav_lens // self.hop + 1

    def log_mel(self, wav: Tensor, wav_lens: Tensor) -> tuple[Tensor, Tensor]:
        """Un-normalised log-mel (B, T, n_mels), padded frames set to zero, and frame counts."""
        with torch.autocast(device_type=wav.device.type, enabled=False):
            feats = torch.log(self.mel(wav.float()) + 1e-6).transpose(1, 2)  # (B, T, F)
        feat_lens = self.lengths(wav_lens)
        return feats * valid_mask(feat_lens, feats.shape[1])[..., None], feat_lens

    def forward(self, wav: Tensor, wav_lens: Tensor) -> tuple[Tensor, Tensor]:
        feats, feat_lens = self.log_mel(wav, wav_lens)  # (B, T, F), (B,)
        valid = valid_mask(feat_lens, feats.shape[1])[..., None]  # (B, T, 1)
        if self.cfg.normalize == "global":
            feats = (feats - self.mean) / self.std
        elif self.cfg.normalize == "utterance":
            n = feat_lens[:, None, None].float()
            mean = feats.sum(1, keepdim=True) / n  # padded frames are zero: sums are exact
            var = ((feats - mean) * valid).pow(2).sum(1, keepdim=True) / n
            feats = (feats - mean) / var.sqrt().clamp_min(1e-5)
        return feats * valid, feat_lens


@torch.no_grad()
def compute_stats(
    frontend: LogMel, batches_or_wavs: Iterable, max_utts: int = 500
) -> tuple[Tensor, Tensor]:
    """Mean and std per mel bin over the valid frames of the first `max_utts` utterances.

    Items may be `Batch`es (or anything with .wav and .wav_lens), dataset items (.wav (S,);
    skipped ones are ignored), (wav, wav_lens) pairs, or 1-D waveforms.
    """
    device = frontend.mean.device
    total = torch.zeros(frontend.cfg.n_mels, dtype=torch.float64, device=device)
    total_sq, frames, utts = torch.zeros_like(total), 0, 0
    for item in batches_or_wavs:
        wav, wav_lens = _as_batch(item)
        if wav is None or wav.shape[0] == 0:
            continue
        take = min(wav.shape[0], max_utts - utts)
        feats, feat_lens = frontend.log_mel(wav[:take].to(device), wav_lens[:take].to(device))
        valid = feats[valid_mask(feat_lens, feats.shape[1])].double()  # (N, F)
        total += valid.sum(0)
        total_sq += valid.pow(2).sum(0)
        frames += valid.shape[0]
        utts += take
        if utts >= max_utts:
            break
    if frames == 0:
        raise ValueError("compute_stats: no utterances with audio to compute statistics from")
    mean = total / frames
    std = (total_sq / frames - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-5)
    return mean.float(), std.float()


def _as_batch(item) -> tuple[Tensor | None, Tensor | None]:
    if hasattr(item, "wav_lens"):
        return item.wav, item.wav_lens
    if hasattr(item, "wav"):
        item = item.wav
    elif hasattr(item, "reason"):  # a skipped dataset item
        return None, None
    if isinstance(item, tuple):
        return item
    return item[None], torch.tensor([item.shape[-1]])


class SpecAugment(nn.Module):
    """Frequency and time masks (set to 0, the mean after normalisation) in training mode only;
    time masks stay inside each utterance and are at most time_width of its frames."""

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, feats: Tensor, feat_lens: Tensor) -> Tensor:
        cfg = self.cfg
        if not self.training or cfg.freq_masks + cfg.time_masks == 0:
            return feats
        B, T, F = feats.shape
        mask = torch.zeros(B, T, F, dtype=torch.bool, device=feats.device)
        bins = torch.arange(F, device=feats.device)
        for _ in range(cfg.freq_masks):
            width, start = _random_span(torch.full((B,), F, device=feats.device), cfg.freq_width)
            mask |= ((bins >= start[:, None]) & (bins < (start + width)[:, None]))[:, None, :]
        frames = torch.arange(T, device=feats.device)
        max_widths = (feat_lens.float() * cfg.time_width).long()
        for _ in range(cfg.time_masks):
            width, start = _random_span(feat_lens, max_widths)
            mask |= ((frames >= start[:, None]) & (frames < (start + width)[:, None]))[..., None]
        mask &= valid_mask(feat_lens, T)[..., None]
        return feats.masked_fill(mask, 0.0)


def _random_span(sizes: Tensor, max_widths: Tensor | int) -> tuple[Tensor, Tensor]:
    """Per row: width uniform in [0, max_width], start uniform in [0, size - width]."""
    max_widths = torch.as_tensor(max_widths, device=sizes.device).expand_as(sizes)
    width = (torch.rand(sizes.shape, device=sizes.device) * (max_widths + 1)).long()
    width = torch.minimum(width, max_widths)
    start = (torch.rand(sizes.shape, device=sizes.device) * (sizes - width + 1)).long()
    return width, torch.minimum(start, sizes - width)
