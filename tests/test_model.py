import pytest
import torch
from omegaconf import OmegaConf

from lmu_asr.config import CONF_DIR
from lmu_asr.features import FeatureConfig
from lmu_asr.model import Encoder, ModelConfig, SpeechRecognizer, reverse_padded
from lmu_asr.speech_dataset import encoder_frames
from lmu_asr.text import VOCAB


def preset(name: str, **overrides) -> ModelConfig:
    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
    return ModelConfig(**(fields | overrides))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_presets_sizes():
    assert n_params(Encoder(preset("lmu_tiny"), 80)) < 200_000
    base = preset("lmu_base")
    assert (base.n_layers, base.d_model, base.order, base.n_heads) == (4, 512, 256, 8)
    small = n_params(Encoder(preset("lmu_small"), 80))
    assert 1_000_000 < small < n_params(Encoder(base, 80))


# Unpadded 3x3 convolutions with stride 2: floor((n - 3) / 2) + 1 = (n - 1) // 2 frames per halving.
# Frames 101, 60, 9 -> 2x: 50, 29, 4 -> 4x: 24, 14, 1.
EXPECTED_LENGTHS = {1: [101, 60, 9], 2: [50, 29, 4], 4: [24, 14, 1]}


@pytest.mark.parametrize("subsampling", [1, 2, 4])
def test_output_shapes_and_lengths(subsampling):
    torch.manual_seed(0)
    enc = Encoder(preset("lmu_tiny", subsampling=subsampling), 80).eval()
    feats, lens = torch.randn(3, 101, 80), torch.tensor([101, 60, 9])
    log_probs, out_lens = enc(feats, lens)
    expected = EXPECTED_LENGTHS[subsampling]
    assert log_probs.shape == (3, expected[0], len(VOCAB))
    assert out_lens.tolist() == expected
    # the CTC feasibility check of the data pipeline counts the same frames
    assert [encoder_frames(n, subsampling) for n in (101, 60, 9)] == expected
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(()), atol=1e-5)


def test_waveform_to_log_probs_lengths():
    """Samples -> 10-ms frames (samples // 160 + 1, centred) -> 4x subsampling."""
    model = SpeechRecognizer(preset("lmu_tiny"), FeatureConfig()).eval()
    wav_lens = torch.tensor([16000, 9999, 4321])  # frames 101, 63, 28
    log_probs, out_lens = model(torch.randn(3, 16000) * 0.1, wav_lens)
    assert out_lens.tolist() == [24, 15, 6]
    assert log_probs.shape == (3, 24, len(VOCAB))


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention": "full"},
        {"attention": "causal"},
        {"attention": "window", "left_context": 3, "right_context": 1},
        {"reverse_lmu": True},
        {"hidden_to_memory": True, "subsampling": 2},
    ],
    ids=["full", "causal", "window", "reverse_lmu", "recurrent_lmu"],
)
def test_padding_never_leaks(overrides):
    """An utterance alone and the same utterance padded inside a batch: same log-probs."""
    torch.manual_seed(0)
    enc = Encoder(preset("lmu_tiny", **overrides), 80).eval()
    lens = torch.tensor([120, 77, 41])
    feats = torch.randn(3, 120, 80) * (torch.arange(120)[None, :, None] < lens[:, None, None])
    # make the padding loud: valid outputs must not depend on it
    feats = feats + 100.0 * (torch.arange(120)[None, :, None] >= lens[:, None, None])
    batch_out, batch_lens = enc(feats, lens)
    for b in range(3):
        alone, alone_len = enc(feats[b : b + 1, : lens[b]], lens[b : b + 1])
        n = int(alone_len)
        assert n == batch_lens[b]
        torch.testing.assert_close(batch_out[b, :n], alone[0, :n], atol=1e-5, rtol=0)


def test_causal_attention_and_lmu_do_not_look_ahead():
    torch.manual_seed(0)
    enc = Encoder(preset("lmu_tiny", attention="causal", subsampling=1), 80).eval()
    feats = torch.randn(1, 50, 80)
    a, _ = enc(feats, torch.tensor([50]))
    feats[:, 30:] = torch.randn(1, 20, 80)
    b, _ = enc(feats, torch.tensor([50]))
    torch.testing.assert_close(a[:, :30], b[:, :30], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_reverse_padded_flips_valid_frames_only():
    x = torch.arange(10.0).view(2, 5, 1)
    y = reverse_padded(x, torch.tensor([5, 3]))
    assert y[:, :, 0].tolist() == [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]]


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = preset("lmu_tiny")
    plain = Encoder(cfg, 80)
    ckpt = Encoder(preset("lmu_tiny", activation_checkpointing=True), 80)
    ckpt.load_state_dict(plain.state_dict())
    feats, lens = torch.randn(2, 64, 80), torch.tensor([64, 40])
    grads = []
    for enc in (plain, ckpt):
        enc.train()
        log_probs, _ = enc(feats, lens)
        log_probs.sum().backward()
        grads.append([p.grad for p in enc.parameters()])
    for g1, g2 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"order": 0}, "model.order"),
        ({"d_model": 30, "n_heads": 4}, "divisible"),
        ({"subsampling": 3}, "model.subsampling"),
        ({"attention": "sideways"}, "model.attention"),
        ({"theta": -1.0}, "model.theta"),
        ({"dropout": 1.5}, "model.dropout"),
    ],
)
def test_config_validation_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)
