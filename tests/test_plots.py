"""Figures of a run: learning curves from metrics.jsonl; attention maps and CTC posteriogram of
one utterance, checked against the model's own computation and the greedy decoder."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import soundfile
import torch
from matplotlib.image import imread
from omegaconf import OmegaConf

from lmu_asr.config import CONF_DIR
from lmu_asr.decode import greedy_decode, ids_to_text
from lmu_asr.features import FeatureConfig
from lmu_asr.model import ModelConfig, SelfAttention, SpeechRecognizer
from lmu_asr.plots import attention_weights, learning_curves, read_metrics, utterance_plots
from lmu_asr.text import BLANK

WINDOW = {"attention": "window", "left_context": 3, "right_context": 1}
KINDS = {"full": {"attention": "full"}, "causal": {"attention": "causal"}, "window": WINDOW}


def tiny(**overrides) -> ModelConfig:
    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "lmu_tiny.yaml"))
    return ModelConfig(**(fields | overrides))


def outside_window(T: int, kind: str) -> torch.Tensor:
    """(T, T) bool: key j is out of query i's reach (derived here, not from the model)."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    if kind == "causal":
        return j > i
    if kind == "window":
        return (j < i - WINDOW["left_context"]) | (j > i + WINDOW["right_context"])
    return torch.zeros(T, T, dtype=torch.bool)


def heads_times_values(att: SelfAttention, weights: torch.Tensor, x: torch.Tensor):
    """weights (B, H, T, T) @ the module's values -> (B, T, D), the layout `att.out` takes."""
    B, T, D = x.shape
    H = att.cfg.n_heads
    v = att.qkv(x).view(B, T, 3, H, D // H)[:, :, 2].transpose(1, 2)  # (B, H, T, Dh)
    return (weights @ v).transpose(1, 2).reshape(B, T, D)


LOSS, WER, CER = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)  # matplotlib C0-C2


def pixels(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
    """How many pixels of an RGB(A) image (floats in [0, 1]) have this colour."""
    return int((np.abs(image[..., :3] * 255 - rgb) < 8).all(-1).sum())


def png(path, height: int, width: int) -> np.ndarray:
    image = imread(path)
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 0.05  # something was drawn
    return image


# --- attention weights -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_attention_weights_are_what_the_module_computes(kind):
    torch.manual_seed(0)
    att = SelfAttention(tiny(**KINDS[kind], dropout=0.1)).eval()
    x, lengths = torch.randn(2, 20, 64), torch.tensor([20, 13])
    before_out = []  # the module's head outputs, before its out-projection
    att.out.register_forward_pre_hook(lambda _, args: before_out.append(args[0]))
    with torch.no_grad():
        att(x, lengths)
        w = attention_weights(att, x, lengths)  # (B, H, T, T)

    assert w.shape == (2, 2, 20, 20)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 20))
    # T (20) <= head size (32): the values are independent, so weights @ V pins the weights down
    torch.testing.assert_close(heads_times_values(att, w, x), before_out[0], atol=1e-5, rtol=1e-5)
    assert (w[:, :, outside_window(20, kind)] == 0).all()
    assert (w[1, :, :13, 13:] == 0).all()  # padded keys of the short utterance
    assert (w[:, :, ~outside_window(20, kind)][0] > 0).all()  # everything else gets some


# --- one utterance ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> torch.Tensor:
    """3 s of a real 16-bit wav: a chirp with noise, written and read back with soundfile."""
    path = tmp_path_factory.mktemp("audio") / "chirp.wav"
    t = np.arange(3 * 16000) / 16000
    rng = np.random.default_rng(0)
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(len(t))
    soundfile.write(path, chirp, 16000, subtype="PCM_16")
    data, rate = soundfile.read(path, dtype="float32")
    assert rate == 16000
    return torch.from_numpy(data)


@pytest.mark.parametrize("kind", ["full", "window"])
def test_utterance_plots_draw_the_model_and_the_greedy_decoder(tmp_path, wav, kind):
    torch.manual_seed(0)
    model = SpeechRecognizer(tiny(**KINDS[kind], dropout=0.1), FeatureConfig(normalize="utterance"))
    model.train()  # the plots must use eval mode (no SpecAugment, no dropout) and restore this

    r = utterance_plots(model, wav, "a chirp", tmp_path / "plots", name="dev-0")

    assert model.training
    assert r.attention == tmp_path / "plots" / "dev-0-attention.png"
    assert r.posteriogram == tmp_path / "plots" / "dev-0-posteriogram.png"
    png(r.attention, 400, 800)  # one panel per block (2)
    png(r.posteriogram, 500, 1000)

    # the same utterance through the model in eval mode, recording what its attention sees
    model.eval()
    seen, before_out = [], []
    for block in model.encoder.blocks:
        block.att.register_forward_pre_hook(lambda _, args: seen.append(args))
        block.att.out.register_forward_pre_hook(lambda _, args: before_out.append(args[0]))
    with torch.no_grad():
        log_probs, lengths = model(wav[None], torch.tensor([len(wav)]))  # (1, T', V), (1,)
    T = int(lengths[0])
    assert T == log_probs.shape[1] == 74

    assert len(r.weights) == len(model.encoder.blocks) == 2
    for block, w, (x, _), y in zip(model.encoder.blocks, r.weights, seen, before_out):
        assert w.shape == (2, T, T)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, T))
        assert (w[:, outside_window(T, kind)] == 0).all()
        with torch.no_grad():
            torch.testing.assert_close(
                heads_times_values(block.att, w[None], x), y, atol=1e-5, rtol=1e-5
            )

    assert r.path == log_probs[0].argmax(-1).tolist()
    runs = [(next(g)[0], c) for c, g in itertools.groupby(enumerate(r.path), key=lambda p: p[1])]
    assert r.emitted == [(t, c) for t, c in runs if c != BLANK]
    assert len(r.emitted) >= 3  # an untrained model still emits a few tokens: not a vacuous check
    assert ids_to_text([c for _, c in r.emitted]) == greedy_decode(log_probs, lengths)[0]
    assert r.hypothesis == greedy_decode(log_probs, lengths)[0]


def test_long_utterance_gets_a_wider_posteriogram(tmp_path, wav):
    torch.manual_seed(0)
    model = SpeechRecognizer(tiny(), FeatureConfig(normalize="utterance"))
    r = utterance_plots(model, wav.repeat(5), "", tmp_path)  # 15 s, 374 encoder frames
    assert len(r.path) == 374
    png(r.posteriogram, 500, 1250)  # 374 / 30 inches at 100 dpi, rounded


# --- learning curves -------------------------------------------------------------------------


def write_metrics(path, steps: int, dev_every: int | None, tail: str = "") -> None:
    lines = []
    for step in range(10, steps + 1, 10):
        row = {"step": step, "time": 1e9 + step, "train/loss": 3.0 * step**-0.3}
        row |= {"train/lr": 1e-3 * min(1.0, step / 50), "train/grad_norm": 1.0}
        lines.append(json.dumps(row))
        if dev_every and step % dev_every == 0:
            dev = {"dev/wer": 1.0 * step**-0.2, "dev/cer": 0.5 * step**-0.3}
            lines.append(json.dumps({"step": step, "time": 1e9 + step, **dev}))
    path.write_text("".join(line + "\n" for line in lines) + tail)


def test_read_metrics_skips_half_lines_and_nulls(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 20, "time": 1.0, "train/loss": 2.0, "train/lr": 0.1}\n'
        '{"step": 10, "time": 0.5, "train/loss": 3.0, "train/lr": 0.05}\n'
        '{"step": 30, "time": 1.5, "train/lo\n'  # a killed job's half line, then a resumed job
        '{"step": 30, "time": 2.0, "train/loss": null, "train/lr": 0.2}\n'
        '{"step": 30, "time": 2.1, "dev/wer": 0.5, "dev/cer": 0.25}\n'
        '{"step": 40, "time": 2.5, "train/loss": 1.5, "train'
    )
    assert read_metrics(path) == {
        "train/loss": [(10, 3.0), (20, 2.0)],
        "train/lr": [(10, 0.05), (20, 0.1), (30, 0.2)],
        "dev/wer": [(30, 0.5)],
        "dev/cer": [(30, 0.25)],
    }


def test_learning_curves_with_and_without_dev_points(tmp_path):
    with_dev, without_dev = tmp_path / "with.jsonl", tmp_path / "without.jsonl"
    write_metrics(with_dev, 500, dev_every=100, tail='{"step": 510, "time": 1e9, "train/lo')
    write_metrics(without_dev, 500, dev_every=None, tail='{"step": 510, "ti')

    out = learning_curves(with_dev, tmp_path / "with.png")
    assert out == tmp_path / "with.png"
    a = png(out, 600, 800)
    b = png(learning_curves(without_dev, tmp_path / "without.png"), 600, 800)
    for image in (a, b):  # the loss curve, in the top panel only
        assert pixels(image[:300], LOSS) > 500 and pixels(image[300:], LOSS) == 0
    assert pixels(a[300:], WER) > 500 and pixels(a[300:], CER) > 500  # dev curves, bottom panel
    assert pixels(b, WER) == pixels(b, CER) == 0


def test_learning_curves_of_a_run_that_has_logged_nothing_yet(tmp_path):
    empty = tmp_path / "metrics.jsonl"
    empty.write_text('{"step": 1')  # killed while writing its first line
    image = png(learning_curves(empty, tmp_path / "curves.png"), 600, 800)
    assert pixels(image, LOSS) == pixels(image, WER) == pixels(image, CER) == 0
