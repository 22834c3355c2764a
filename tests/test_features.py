import pytest
import torch

from lmu_asr.data import Item, Skipped, collate
from lmu_asr.features import FeatureConfig, LogMel, SpecAugment, compute_stats

LENS = [16000, 9999, 4321]


def waves(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=generator) * 0.1 for n in LENS]


def padded(wavs):
    batch = collate([Item(str(i), w, torch.ones(1, dtype=torch.long)) for i, w in enumerate(wavs)])
    return batch.wav, batch.wav_lens


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_mels": 0}, "n_mels"),
        ({"hop_ms": 30.0}, "win_ms"),
        ({"normalize": "cmvn"}, "normalize"),
        ({"freq_width": 81}, "freq_width"),
        ({"time_width": 1.5}, "time_width"),
        ({"time_masks": -1}, "time_masks"),
    ],
)
def test_feature_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"features.{field}"):
        FeatureConfig(**kwargs)


def test_shapes_and_lengths():
    wav, wav_lens = padded(waves())
    feats, feat_lens = LogMel(FeatureConfig())(wav, wav_lens)
    assert feats.shape == (3, 16000 // 160 + 1, 80) and feats.dtype == torch.float32
    assert feat_lens.tolist() == [n // 160 + 1 for n in LENS]


@pytest.mark.parametrize("normalize", ["none", "global", "utterance"])
def test_padded_batch_equals_each_utterance_alone(normalize):
    frontend = LogMel(FeatureConfig(normalize=normalize))
    frontend.set_stats(torch.linspace(-3, 1, 80), torch.linspace(1, 2, 80))
    wavs = waves()
    feats, feat_lens = frontend(*padded(wavs))
    for b, wav in enumerate(wavs):
        alone, alone_lens = frontend(wav[None], torch.tensor([len(wav)]))
        n = int(alone_lens[0])
        assert feat_lens[b] == n
        torch.testing.assert_close(feats[b, :n], alone[0], atol=1e-4, rtol=1e-4)
        assert feats[b, n:].abs().sum() == 0


def test_features_stay_float32_under_autocast():
    wav, wav_lens = padded(waves())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, _ = LogMel(FeatureConfig())(wav, wav_lens)
    assert feats.dtype == torch.float32


def test_stats_use_valid_frames_only():
    frontend = LogMel(FeatureConfig(normalize="none"))
    wavs = waves()
    mean, std = compute_stats(frontend, [padded(wavs)])
    alone = [frontend(w[None], torch.tensor([len(w)]))[0][0] for w in wavs]
    frames = torch.cat(alone)  # only valid frames
    torch.testing.assert_close(mean, frames.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(std, frames.std(0, unbiased=False), atol=1e-4, rtol=1e-4)
    # the same numbers from dataset items (skipped ones ignored) and from 1-D waveforms
    items = [Skipped("x", "too long")] + [
        Item(str(i), w, torch.ones(1)) for i, w in enumerate(wavs)
    ]
    torch.testing.assert_close(compute_stats(frontend, items)[0], mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compute_stats(frontend, wavs)[1], std, atol=1e-4, rtol=1e-4)
    first_only = compute_stats(frontend, [padded(wavs)], max_utts=1)[0]
    torch.testing.assert_close(first_only, alone[0].mean(0), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no utterances"):
        compute_stats(frontend, [Skipped("x", "empty audio")])


def test_stats_from_a_speech_dataset(audio_files):
    from lmu_asr.data import SpeechDataset, read_manifest

    frontend = LogMel(FeatureConfig())
    dataset = SpeechDataset(read_manifest(audio_files["manifest"]))
    mean, std = compute_stats(frontend, dataset, max_utts=100)
    assert mean.shape == std.shape == (80,) and (std > 0).all()
    torch.testing.assert_close(
        compute_stats(frontend, [dataset[0]])[0], compute_stats(frontend, dataset, 1)[0]
    )


def test_global_normalisation_gives_zero_mean_unit_std():
    frontend = LogMel(FeatureConfig(normalize="global"))
    wav, wav_lens = padded(waves())
    frontend.set_stats(*compute_stats(frontend, [(wav, wav_lens)]))
    feats, feat_lens = frontend(wav, wav_lens)
    valid = torch.cat([feats[b, :n] for b, n in enumerate(feat_lens)])
    torch.testing.assert_close(valid.mean(0), torch.zeros(80), atol=1e-3, rtol=0)
    torch.testing.assert_close(valid.std(0, unbiased=False), torch.ones(80), atol=1e-3, rtol=0)


def test_utterance_normalisation_per_utterance():
    feats, feat_lens = LogMel(FeatureConfig(normalize="utterance"))(*padded(waves()))
    for b, n in enumerate(feat_lens):
        torch.testing.assert_close(feats[b, :n].mean(0), torch.zeros(80), atol=1e-3, rtol=0)


def test_stats_survive_a_state_dict_round_trip():
    frontend = LogMel(FeatureConfig())
    frontend.set_stats(torch.arange(80.0), torch.full((80,), 2.0))
    state = frontend.state_dict()
    assert {"mean", "std"} <= set(state)
    restored = LogMel(FeatureConfig())
    restored.load_state_dict(state)
    wav, wav_lens = padded(waves())
    torch.testing.assert_close(restored(wav, wav_lens)[0], frontend(wav, wav_lens)[0])
    with pytest.raises(ValueError, match="shape"):
        restored.set_stats(torch.zeros(40), torch.ones(40))
    with pytest.raises(ValueError, match="std must be > 0"):
        restored.set_stats(torch.zeros(80), torch.zeros(80))


def test_specaugment_masks_inside_valid_frames_only_and_only_in_training():
    torch.manual_seed(0)
    cfg = FeatureConfig(time_masks=3, time_width=0.2, freq_masks=2, freq_width=20)
    feats, feat_lens = LogMel(FeatureConfig(normalize="none"))(*padded(waves()))
    feats = feats + 100.0 * (feats != 0)  # no valid value is 0 before masking
    specaug = SpecAugment(cfg)
    assert specaug.eval()(feats, feat_lens) is feats
    specaug.train()
    masked_any = False
    for _ in range(20):
        out = specaug(feats, feat_lens)
        for b, n in enumerate(feat_lens.tolist()):
            assert out[b, n:].abs().sum() == 0
            zero_frames = (out[b, :n] == 0).all(-1).sum().item()
            assert zero_frames <= cfg.time_masks * int(n * cfg.time_width)
            masked_any |= bool((out[b, :n] == 0).any())
    assert masked_any


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_frontend_runs_on_cuda():
    frontend = LogMel(FeatureConfig()).cuda()
    wav, wav_lens = padded(waves())
    feats, feat_lens = frontend(wav.cuda(), wav_lens.cuda())
    cpu_feats, _ = LogMel(FeatureConfig())(wav, wav_lens)
    assert feats.is_cuda and feats.dtype == torch.float32
    torch.testing.assert_close(feats.cpu(), cpu_feats, atol=1e-3, rtol=1e-3)
    SpecAugment(FeatureConfig()).train()(feats, feat_lens)
