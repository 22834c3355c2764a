"""Waveform augmentation: deterministic for a seed, different for another, lengths follow the
speed factor, padding stays silent, CTC stays feasible, and disabled means the batch unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from lmu_asr.augment import AugmentConfig, augment_batch
from lmu_asr.data import Batch

ALL = AugmentConfig(speeds=[0.9, 1.1], reverb_prob=0.5, noise_prob=0.5)
KW = dict(sample_rate=16000, hop=160, subsampling=4)


def batch(lens=(16000, 12000, 9000), n_tokens=(5, 4, 3)) -> Batch:
    g = torch.Generator().manual_seed(0)
    wav = torch.zeros(len(lens), max(lens))
    for b, n in enumerate(lens):
        wav[b, :n] = 0.1 * torch.randn(n, generator=g)
    tokens = torch.zeros(len(lens), max(n_tokens), dtype=torch.long)
    for b, n in enumerate(n_tokens):
        tokens[b, :n] = torch.arange(1, n + 1)
    return Batch(wav, torch.tensor(lens), tokens, torch.tensor(n_tokens), list("abc"[: len(lens)]))


def test_same_seed_same_batch_other_seed_another():
    a, b, c = (augment_batch(batch(), ALL, seed, **KW) for seed in (7, 7, 8))
    assert torch.equal(a.wav, b.wav) and torch.equal(a.wav_lens, b.wav_lens)
    assert not (a.wav.shape == c.wav.shape and torch.equal(a.wav, c.wav))


def test_disabled_is_the_identity():
    original = batch()
    assert augment_batch(original, AugmentConfig(), 3, **KW) is original
    assert not AugmentConfig(speeds=[1.0]).enabled and ALL.enabled


@pytest.mark.parametrize("speed", [0.9, 1.1])
def test_lengths_follow_the_speed_and_padding_stays_silent(speed):
    cfg = AugmentConfig(speeds=[speed], reverb_prob=1.0, noise_prob=1.0)
    original = batch()
    out = augment_batch(original, cfg, 1, **KW)
    expected = [math.ceil(n / speed) for n in original.wav_lens.tolist()]
    assert out.wav_lens.tolist() == expected and out.wav.shape[1] == max(expected)
    for b, n in enumerate(expected):
        assert out.wav[b, n:].abs().max() == 0 if n < out.wav.shape[1] else True
        assert out.wav[b, :n].abs().mean() > 0.01  # still speech-loud
    assert torch.equal(out.tokens, original.tokens) and out.ids == original.ids


def test_a_speed_up_that_would_break_ctc_is_not_applied():
    # 0.3 s for 7 tokens: 7 encoder frames at 4x subsampling, one short after a 1.1 speed-up
    tight = batch(lens=(4800,), n_tokens=(7,))
    out = augment_batch(tight, AugmentConfig(speeds=[1.1]), 0, **KW)
    assert out.wav_lens.tolist() == [4800]


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(speeds=[]), "augment.speeds"),
        (dict(speeds=[3.0]), "augment.speeds"),
        (dict(noise_prob=1.5), "augment.noise_prob"),
        (dict(reverb_prob=-0.1), "augment.reverb_prob"),
        (dict(rt60_min=0.6, rt60_max=0.3), "augment.rt60_min"),
        (dict(snr_min=30.0, snr_max=10.0), "augment.snr_min"),
    ],
)
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**kw)
