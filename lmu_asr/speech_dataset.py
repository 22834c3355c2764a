"""Decoding and checking one utterance at a time: `SpeechDataset`. Re-exported by `lmu_asr.data`.

A bad utterance (unreadable or empty audio, empty or out-of-alphabet transcript, too long, too
many tokens for CTC in its frames, audio whose length is not the duration its manifest gives)
never stops a run: it comes back as `Skipped(id, reason)`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import soundfile
import torch
import torchaudio.functional

from lmu_asr.features import hop_samples
from lmu_asr.hf import HFAudio
from lmu_asr.prepared import ShardAudio
from lmu_asr.text import encode

if TYPE_CHECKING:
    from lmu_asr.data import Utterance


def encoder_frames(feat_frames: int, subsampling: int) -> int:
    """Encoder output frames after `subsampling` (1, 2 or 4) with unpadded stride-2 3x3 convs:
    (n - 1) // 2 per halving, a little less than feat_frames // subsampling."""
    for _ in range({1: 0, 2: 1, 4: 2}[subsampling]):
        feat_frames = (feat_frames - 1) // 2
    return feat_frames


def ctc_frames_needed(tokens: Sequence[int]) -> int:
    """The fewest frames CTC can align `tokens` to: one a token, plus a blank between repeats."""
    return len(tokens) + sum(a == b for a, b in zip(tokens, tokens[1:], strict=False))


@dataclass
class Item:
    id: str
    wav: torch.Tensor  # (S,) float32
    tokens: torch.Tensor  # (L,) long


@dataclass
class Skipped:
    id: str
    reason: str  # one of SKIP_REASONS


SKIP_REASONS = (
    "empty transcript",
    "out-of-alphabet",
    "too long",
    "unreadable audio",
    "empty audio",
    "ctc infeasible",
    "duration mismatch",
)


def duration_mismatch(declared: float, actual: float) -> bool:
    """Whether decoded audio is not the length its manifest (or HF row) declares: the file changed
    since the manifest was written. The slack covers rounded durations and codec padding."""
    return declared > 0 and abs(actual - declared) > 0.2 + 0.02 * declared


@dataclass
class _Bad(Exception):
    reason: str
    detail: str = field(default="")


class SpeechDataset(torch.utils.data.Dataset):
    """Decodes and checks utterances. A bad one comes back as `Skipped(id, reason)` (collate
    reports it in `Batch.skipped`), or with strict=True raises ValueError naming it."""

    def __init__(
        self,
        utts: Sequence[Utterance],
        sample_rate: int = 16000,
        max_duration: float = 20.0,
        strict: bool = False,
        subsampling: int = 4,
        hop_ms: float = 10.0,
    ) -> None:
        if subsampling not in (1, 2, 4):
            raise ValueError(f"subsampling must be 1, 2 or 4, got {subsampling}")
        self.utts = utts
        self.sample_rate = sample_rate
        self.max_duration = max_duration
        self.strict = strict
        self.subsampling = subsampling
        self.hop = hop_samples(sample_rate, hop_ms)

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, index: int) -> Item | Skipped:
        utt = self.utts[index]
        try:
            return self._load(utt)
        except _Bad as bad:
            if self.strict:
                where = "<bytes>" if isinstance(utt.audio, bytes) else str(utt.audio)
                raise ValueError(
                    f"utterance {utt.id} ({where}): {bad.reason}: {bad.detail}"
                ) from None
            return Skipped(utt.id, bad.reason)

    def _load(self, utt: Utterance) -> Item:
        if not utt.text.strip():
            raise _Bad("empty transcript", "the normalised transcript is empty")
        try:
            tokens = encode(utt.text)
        except ValueError as err:
            raise _Bad("out-of-alphabet", str(err)) from None
        if utt.duration > self.max_duration:
            raise _Bad("too long", f"{utt.duration:.2f} s > max_duration {self.max_duration} s")
        wav = self._decode(utt.audio)
        if wav.numel() == 0:
            raise _Bad("empty audio", "the audio has no samples")
        if wav.numel() > self.max_duration * self.sample_rate:
            seconds = wav.numel() / self.sample_rate
            raise _Bad("too long", f"{seconds:.2f} s > max_duration {self.max_duration} s")
        if duration_mismatch(utt.duration, wav.numel() / self.sample_rate):
            raise _Bad(
                "duration mismatch",
                f"the manifest says {utt.duration:.2f} s, the audio has "
                f"{wav.numel() / self.sample_rate:.2f} s: it changed since the manifest was "
                "written; restore the file or fix its duration",
            )
        available = encoder_frames(wav.numel() // self.hop + 1, self.subsampling)
        needed = ctc_frames_needed(tokens)
        if needed > available:
            raise _Bad(
                "ctc infeasible",
                f"{needed} CTC frames needed, {available} available "
                f"after {self.subsampling}x subsampling",
            )
        return Item(utt.id, wav, torch.tensor(tokens, dtype=torch.long))

    def _decode(self, audio: str | bytes | HFAudio | ShardAudio) -> torch.Tensor:
        try:
            return read_audio(audio, self.sample_rate)
        except ValueError as err:
            raise _Bad("unreadable audio", str(err)) from None


def read_audio(audio: str | bytes | HFAudio | ShardAudio, sample_rate: int = 16000) -> torch.Tensor:
    """A file path, encoded bytes (wav/flac/ogg), an HF row or a prepared shard's row -> (S,)
    float32 mono at `sample_rate`. Raises ValueError naming the file when it cannot be decoded."""
    if isinstance(audio, str) and not os.path.exists(audio):
        raise ValueError(f"cannot read audio {audio}: no such file")
    name = "<bytes>" if isinstance(audio, bytes) else str(audio)
    try:
        source = audio.load() if isinstance(audio, HFAudio | ShardAudio) else audio
        data, rate = soundfile.read(
            io.BytesIO(source) if isinstance(source, bytes) else source,
            dtype="float32",
            always_2d=True,
        )
    except Exception as err:  # libsndfile, missing file, bad HF row: all mean unreadable
        raise ValueError(f"cannot read audio {name}: {type(err).__name__}: {err}") from None
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))  # mix to mono
    bad = int((~torch.isfinite(wav)).sum())
    if bad:  # a float file can hold them; one would turn the feature statistics and loss to NaN
        raise ValueError(f"cannot read audio {name}: {bad} samples are NaN or infinite")
    if rate != sample_rate and wav.numel():
        wav = torchaudio.functional.resample(wav, rate, sample_rate)
    return wav
