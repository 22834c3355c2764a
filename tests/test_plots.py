"""Figures of a run and of the notebook: learning curves from metrics.jsonl; spectrograms; the
LMU's delay system, paths and memory; attention maps and CTC posteriogram of one utterance. Each
is checked against the computation it draws, and to be labelled and non-empty."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread
from omegaconf import OmegaConf

from lmu_asr.config import CONF_DIR, ROOT
from lmu_asr.decode import greedy_decode, ids_to_text
from lmu_asr.features import FeatureConfig
from lmu_asr.lmu import LMU, causal_conv, impulse_response, legendre_delay, zoh
from lmu_asr.model import ModelConfig, SelfAttention, SpeechRecognizer
from lmu_asr.plots import (
    attention_figure,
    attention_heads_figure,
    attention_weights,
    delay_figure,
    greedy_path,
    learning_curves,
    learning_curves_figure,
    legendre_readout,
    lmu_memory,
    lmu_memory_figure,
    lmu_paths_figure,
    log_mel,
    log_mel_figure,
    posteriogram_figure,
    read_metrics,
    utterance_plots,
)
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


def panels(fig: Figure) -> list:
    """The axes of a figure that show data (not colorbars, not switched-off grid cells)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.axison]


def assert_labelled(fig: Figure) -> None:
    """Every panel has a title (its own, its twin's or the figure's) and a y label (its own or
    the figure's) and shows something: finite, non-constant images or lines, or a message; the
    figure has an x label. It renders to a PNG that is not blank."""
    axes = panels(fig)
    assert axes
    for ax in axes:
        twins = [a for a in axes if a.get_position().bounds == ax.get_position().bounds]
        titles = [a.get_title(loc) for a in twins for loc in ("left", "center", "right")]
        assert any(titles) or fig.get_suptitle(), f"untitled panel {ax}"
        assert ax.get_ylabel() or fig.get_supylabel(), f"no y label: {titles}"
        images = [np.ma.getdata(im.get_array()).astype(float) for im in ax.get_images()]
        lines = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
        for data in images:
            assert data.size and np.isfinite(data).all() and data.std() > 0, titles
        shown = [d for d in images + lines if d.size > 1 and d.std() > 0]
        assert shown or ax.texts, f"empty panel: {titles}"
    assert any(ax.get_xlabel() for ax in axes) or fig.get_supxlabel()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert imread(io.BytesIO(buffer.getvalue()))[..., :3].std() > 0.05


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
    png(r.posteriogram, 800, 1000)  # spectrogram over posteriogram

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
    png(r.posteriogram, 800, 1250)  # 374 / 30 inches at 100 dpi, rounded


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
    for metrics in (with_dev, without_dev):
        assert_labelled(learning_curves_figure(metrics))


def test_learning_curves_of_a_run_that_has_logged_nothing_yet(tmp_path):
    empty = tmp_path / "metrics.jsonl"
    empty.write_text('{"step": 1')  # killed while writing its first line
    image = png(learning_curves(empty, tmp_path / "curves.png"), 600, 800)
    assert pixels(image, LOSS) == pixels(image, WER) == pixels(image, CER) == 0


SLOW_IPYTHON = """
import time
time.sleep(3)  # another thread finds this module in sys.modules, half made, meanwhile
version_info = (9, 0, 0)
"""

RACE = """
import sys, threading, time
from pathlib import Path
from lmu_asr.plots import learning_curves
threading.Thread(target=lambda: __import__("IPython"), daemon=True).start()
while "IPython" not in sys.modules:
    time.sleep(0.01)
print(learning_curves(Path(sys.argv[1]), Path(sys.argv[2])))
"""


def test_plotting_while_another_thread_imports_ipython(tmp_path):
    """The training job plots its report while the MLflow mirror thread may be importing IPython
    (mlflow's notebook checks); matplotlib reads IPython.version_info when it makes a canvas and
    failed on the half-imported module (CI, test_mlflow_ui). Reproduced with an IPython whose
    import takes 3 s."""
    (tmp_path / "fake" / "IPython").mkdir(parents=True)
    (tmp_path / "fake" / "IPython" / "__init__.py").write_text(SLOW_IPYTHON)
    write_metrics(tmp_path / "metrics.jsonl", 100, dev_every=50)
    out = tmp_path / "curves.png"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT)])}
    cmd = [sys.executable, "-c", RACE, str(tmp_path / "metrics.jsonl"), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    png(out, 600, 800)


# --- spectrograms ----------------------------------------------------------------------------


def test_log_mel_figure_draws_each_utterance_under_its_transcript(wav):
    short = wav[:16000]
    fig = log_mel_figure([wav, short], ["a rising chirp", "its first second"])
    assert_labelled(fig)
    axes = panels(fig)
    assert [ax.get_title(loc="left") for ax in axes] == ["a rising chirp", "its first second"]
    for ax, w in zip(axes, [wav, short]):
        (image,) = ax.get_images()
        np.testing.assert_array_equal(image.get_array(), log_mel(w).numpy())
    spec = log_mel(wav)
    assert spec.shape == (80, 301)  # 80 bands, 10 ms hop
    peaks = spec.argmax(0)  # the chirp rises from 200 Hz to 2 kHz: so does its loudest band
    assert peaks[-20:].float().mean() > peaks[:20].float().mean() + 20


# --- the LMU ---------------------------------------------------------------------------------


def smooth_signal(order: int, theta: float, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    freqs = torch.rand(6, generator=g, dtype=torch.float64) * order / (10 * theta)
    phases = 2 * math.pi * torch.rand(6, generator=g, dtype=torch.float64)
    t = torch.arange(steps, dtype=torch.float64)
    return torch.sin(2 * math.pi * freqs[:, None] * t + phases[:, None]).sum(0)


def test_legendre_readout_reads_delayed_input_back_from_the_memory():
    order, theta, steps = 16, 64, 600
    u = smooth_signal(order, theta, steps)
    Ad, Bd = zoh(*legendre_delay(order, theta))
    m, memory = torch.zeros(order, dtype=torch.float64), []
    for t in range(steps):  # the recurrence itself, step by step
        m = Ad @ m + Bd * u[t]
        memory.append(m)
    memory = torch.stack(memory, 1)  # (order, steps)

    def rms(delay: int, read_as: int) -> float:
        read = legendre_readout(order, torch.tensor([read_as / theta])) @ memory  # (1, steps)
        true = u[theta - delay : steps - delay]  # past the first window
        return float((read[0, theta:] - true).pow(2).mean().sqrt() / u.std())

    for delay in (0, 16, 32, 48, 64):
        assert rms(delay, delay) < 0.1, delay
    assert rms(64, 32) > 0.5 and rms(0, 64) > 0.5  # the readout picks one delay, not any
    P = legendre_readout(4, torch.tensor([0.0, 0.5, 1.0]))  # P_i(2r - 1) at -1, 0, 1
    torch.testing.assert_close(P, torch.tensor([[1, -1, 1, -1], [1, 0, -0.5, 0], [1, 1, 1, 1.0]],
                                               dtype=torch.float64))  # fmt: skip


def test_delay_figure_shows_impulse_responses_and_delays_read_back():
    fig = delay_figure(16, 64.0)
    assert_labelled(fig)
    ax_h, ax_u = panels(fig)
    H = impulse_response(*zoh(*legendre_delay(16, 64.0)), 96)
    for i, line in enumerate(ax_h.get_lines()[:5]):
        np.testing.assert_allclose(line.get_ydata(), H[i].numpy())
    lines = {line.get_label(): line.get_ydata() for line in ax_u.get_lines()}
    for delay in (32, 64):
        (read,) = [v for k, v in lines.items() if k.startswith("read from m_t") and
                   np.abs(v - lines[f"u(t - {delay})"])[delay:].mean() < 0.1]  # fmt: skip
        assert np.abs(read - lines["input u(t)"]).mean() > 0.3  # it is not the input itself


def test_lmu_paths_figure_draws_both_paths_and_their_difference():
    torch.manual_seed(0)
    fft, rec = LMU(8, 8, 2, 16, 20.0), LMU(8, 8, 2, 16, 20.0, parallel=False)
    rec.load_state_dict(fft.state_dict())
    x = torch.sin(torch.arange(200.0)[None, :, None] / torch.linspace(2, 20, 8))
    with torch.no_grad():
        h_fft, h_rec = fft(x)[0], rec(x)[0]
    fig = lmu_paths_figure(h_fft, h_rec)
    assert_labelled(fig)
    top, bottom = panels(fig)
    diff = (h_fft - h_rec).abs().amax(dim=(0, 2))
    assert 0 < diff.max() < 1e-4
    np.testing.assert_allclose(bottom.get_lines()[0].get_ydata(), diff.double().numpy())
    assert f"{float(diff.max()):.1e}" in top.get_title()
    assert len(top.get_lines()) == 6  # 3 units x 2 paths


@pytest.mark.parametrize("extra", [{}, {"trainable_theta": True, "hidden_to_memory": True}])
def test_lmu_memory_is_what_the_block_s_lmu_holds(wav, extra):
    torch.manual_seed(0)
    model = SpeechRecognizer(tiny(**extra), FeatureConfig(normalize="utterance")).train()
    lmu = model.encoder.blocks[1].lmu
    inputs = []
    lmu.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    m = lmu_memory(model, wav, block=1)
    assert model.training
    assert m.shape == (74, 4, 16)  # (T', memory_d, order)
    if extra:  # recurrent-only: the memory after the last frame is the layer's returned state
        with torch.no_grad():
            _, state = lmu(inputs[0])
        torch.testing.assert_close(m[-1], state.m[0], atol=1e-5, rtol=1e-4)
    else:  # the FFT convolution of the memory's input u = W_u x with the impulse response
        with torch.no_grad():
            u = lmu.W_u(inputs[0]).double().transpose(1, 2)  # (1, D, T')
        H = impulse_response(*zoh(*legendre_delay(16, 16.0)), 74)
        expected = causal_conv(u, H)[0].permute(2, 0, 1)  # (T', D, N)
        torch.testing.assert_close(m.double(), expected, atol=1e-5, rtol=1e-4)

    fig = lmu_memory_figure(model, wav, "a chirp", block=1)
    assert_labelled(fig)
    shapes = [ax.get_images()[0].get_array().shape for ax in panels(fig)]
    assert shapes == [(80, 301), (4, 74), (16, 74), (64, 74)]


# --- attention and the posteriogram ----------------------------------------------------------


def test_attention_figures_draw_every_block_and_head(tmp_path, wav):
    torch.manual_seed(0)
    model = SpeechRecognizer(tiny(), FeatureConfig(normalize="utterance"))
    weights = utterance_plots(model, wav, "a chirp", tmp_path).weights  # 2 blocks x (2, T, T)
    fig = attention_heads_figure(weights, 40)
    assert_labelled(fig)
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == [
        f"block {b}, head {h}" for b in (1, 2) for h in (1, 2)
    ]
    for ax, (b, h) in zip(axes, itertools.product(range(2), range(2))):
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), weights[b][h].numpy())
    fig = attention_figure(weights, 40)
    assert_labelled(fig)
    for ax, w in zip(panels(fig), weights):
        np.testing.assert_allclose(ax.get_images()[0].get_array(), w.mean(0).numpy())


def test_posteriogram_figure_marks_each_emitted_token_where_it_is_emitted():
    path = [0, 0, 8, 8, 0, 3, 1, 1, 0, 8, 0, 0]  # blank f f blank a space space blank f ...
    lp = torch.nn.functional.one_hot(torch.tensor(path), 29).double().mul(9).log_softmax(-1)
    spec = torch.randn(80, 4 * len(path) + 7)
    fig = posteriogram_figure(spec, lp.float(), "fa f", "fa f", hop_ms=10, subsampling=4)
    assert_labelled(fig)
    ax_spec, ax = panels(fig)
    assert greedy_path(lp) == (path, [(2, 8), (5, 3), (6, 1), (9, 8)])
    centres = [(4 * t + 3) * 0.01 for t in (2, 5, 6, 9)]  # encoder frame t: log-mel 4t .. 4t+6
    marks = [line.get_xdata()[0] for line in ax_spec.get_lines()]
    np.testing.assert_allclose(marks, centres)
    assert [t.get_text() for t in ax_spec.texts] == ["f", "a", "␣", "f"]
    np.testing.assert_array_equal(ax_spec.get_images()[0].get_array(), spec.numpy())
    (dots,) = ax.get_lines()
    np.testing.assert_array_equal(dots.get_ydata(), path)
    assert ax_spec.get_title(loc="left") == "REF: fa f\nHYP: fa f"
