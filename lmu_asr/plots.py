"""Figures of a run (MLflow artifacts) and of the demo notebook: learning curves from
metrics.jsonl; log-mel spectrograms; the LMU's delay system, its two paths and what its memory
holds over an utterance; for one utterance, the self-attention maps and the CTC posteriogram.

`*_figure` functions return a `matplotlib.figure.Figure` (Jupyter shows it inline) and `save`
writes one with the Agg renderer; pyplot is never imported, so plotting changes no global state
and is safe inside a training process.
"""

from __future__ import annotations

import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from lmu_asr.decode import greedy_decode
from lmu_asr.features import FeatureConfig, LogMel
from lmu_asr.lmu import causal_conv, impulse_response, legendre_delay, zoh
from lmu_asr.model import SelfAttention, SpeechRecognizer
from lmu_asr.text import BLANK, VOCAB
from lmu_asr.tracking import read_jsonl

DPI = 100
LOG_PROB_FLOOR = -15.0  # colour scale of the posteriogram; anything less likely looks the same
_SYMBOLS = ["∅", "␣", *VOCAB[2:]]  # blank and space made visible


def _wait_for_ipython() -> None:
    """matplotlib reads `sys.modules["IPython"].version_info` whenever it makes a canvas. In a
    training job the MLflow mirror thread may be importing IPython at that moment (mlflow's
    notebook checks), and the half-made module has no version_info yet; `import` waits for it."""
    if "IPython" in sys.modules:
        import IPython  # noqa: F401


def figure(**kwargs) -> Figure:
    _wait_for_ipython()
    return Figure(dpi=DPI, layout="constrained", **kwargs)


def save(fig: Figure, out: Path) -> Path:
    _wait_for_ipython()
    fig.savefig(out, dpi=DPI)
    return Path(out)


def read_metrics(metrics_jsonl: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] sorted by step, from metrics.jsonl. Lines that are not JSON (the
    half line of a killed job) and null (non-finite) values are skipped."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in read_jsonl(metrics_jsonl):
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, int | float) and math.isfinite(v):
                series.setdefault(k, []).append((int(row["step"]), float(v)))
    return {k: sorted(points) for k, points in series.items()}


def learning_curves(metrics_jsonl: Path, out: Path) -> Path:
    """PNG (800 x 600) of learning_curves_figure."""
    return save(learning_curves_figure(metrics_jsonl), out)


def learning_curves_figure(metrics_jsonl: Path) -> Figure:
    """Training loss (log scale) and learning rate vs step, above dev WER/CER vs step; a panel
    without points yet says so."""
    series = read_metrics(metrics_jsonl)
    fig = figure(figsize=(8, 6))
    ax_loss, ax_dev = fig.subplots(2, 1, sharex=True)
    loss = [(s, v) for s, v in series.get("train/loss", []) if v > 0]  # log scale
    if loss:
        ax_loss.plot(*zip(*loss), color="C0", label="train loss (CTC per token)")
        ax_loss.set_yscale("log")
    else:
        _say(ax_loss, "no training loss logged yet")
    if lr := series.get("train/lr"):
        ax_lr = ax_loss.twinx()
        ax_lr.plot(*zip(*lr), color="0.6", linestyle="--", linewidth=1, label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_ylim(0, 1.3 * max(v for _, v in lr) or 1.0)  # keep the top free for the legend
    if loss or lr:
        handles = [h for ax in fig.axes for h in ax.get_lines()]
        ax_loss.legend(handles=handles, fontsize=8, loc="upper center")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training", fontsize=10)
    ax_loss.grid(alpha=0.3)

    dev = {name: series.get(f"dev/{name}", []) for name in ("wer", "cer")}
    if any(dev.values()):
        for i, (name, points) in enumerate(dev.items()):
            if points:
                best_step, best = min(points, key=lambda p: (p[1], p[0]))
                label = f"dev {name.upper()} (best {best:.1%} @ {best_step})"
                steps, values = zip(*points)
                ax_dev.plot(steps, [100 * v for v in values], f"C{i + 1}o-", ms=3, label=label)
        ax_dev.legend(fontsize=8)
        ax_dev.set_ylim(bottom=0)
    else:
        _say(ax_dev, "no dev evaluation yet")
    ax_dev.set_ylabel("error rate (%)")
    ax_dev.set_xlabel("step")
    ax_dev.set_title("validation (greedy decoding)", fontsize=10)
    ax_dev.grid(alpha=0.3)
    return fig


# --- spectrograms ----------------------------------------------------------------------------


def log_mel(wav: Tensor, features: FeatureConfig | None = None, sample_rate: int = 16000) -> Tensor:
    """(n_mels, T) log-mel of a waveform (S,): the model's frontend before its normalisation."""
    return _frontend_log_mel(LogMel(features or FeatureConfig(), sample_rate), wav)


@torch.no_grad()
def _frontend_log_mel(frontend: LogMel, wav: Tensor) -> Tensor:
    """(n_mels, T) un-normalised log-mel of a waveform (S,) computed by `frontend`."""
    device = frontend.mean.device
    feats, _ = frontend.log_mel(wav.reshape(1, -1).float().to(device),
                                torch.tensor([wav.numel()], device=device))  # fmt: skip
    return feats[0].T.float().cpu()


def log_mel_figure(
    wavs: list[Tensor], texts: list[str], features: FeatureConfig | None = None,
    sample_rate: int = 16000,
) -> Figure:  # fmt: skip
    """One panel per utterance: its log-mel spectrogram, titled with its transcript."""
    hop_s = (features or FeatureConfig()).hop_ms / 1000
    fig = figure(figsize=(10, 2.4 * len(wavs) + 0.2))
    axes = fig.subplots(len(wavs), 1, squeeze=False, sharex=True)[:, 0]
    for i, (ax, wav, text) in enumerate(zip(axes, wavs, texts)):
        _spectrogram(ax, log_mel(wav, features, sample_rate), hop_s, xlabel=i == len(wavs) - 1)
        ax.set_title(textwrap.shorten(text, 110, placeholder=" …"), fontsize=9, loc="left")
    return fig


def _spectrogram(ax, spec: Tensor, hop_s: float, xlabel: bool = True) -> None:
    n_mels, T = spec.shape
    extent = (-hop_s / 2, (T - 0.5) * hop_s, -0.5, n_mels - 0.5)
    im = ax.imshow(spec.numpy(), origin="lower", aspect="auto", cmap="viridis", extent=extent)
    ax.figure.colorbar(im, ax=ax, label="log energy", pad=0.01)
    ax.set_xlabel("time (s)" if xlabel else "")
    ax.set_ylabel("mel bin")


# --- the LMU ---------------------------------------------------------------------------------


def legendre_readout(order: int, r: Tensor) -> Tensor:
    """(R, order) C with u(t - r theta) ~= C @ m_t for the fractions r (R,) of the window theta:
    the shifted Legendre polynomials P_i(2r - 1) (Voelker et al. 2019), float64."""
    x = 2 * r.double() - 1
    P = [torch.ones_like(x), x]
    for n in range(1, order - 1):  # Bonnet's recursion
        P.append(((2 * n + 1) * x * P[n] - n * P[n - 1]) / (n + 1))
    return torch.stack(P[:order], -1)


def delay_figure(order: int, theta: float, seed: int = 0) -> Figure:
    """The Legendre delay system as the LMU discretises it (zero-order hold, one step = one
    frame). Left: impulse responses of the first memory dimensions, Legendre polynomials over
    the window theta. Right: a smooth random signal, the signal delayed by theta/2 and theta, and
    the same delays read back from the memory with legendre_readout."""
    steps = int(5 * theta)
    H = impulse_response(*zoh(*legendre_delay(order, theta)), steps)  # (order, steps)
    g = torch.Generator().manual_seed(seed)
    freqs = torch.rand(6, generator=g, dtype=torch.float64) * order / (10 * theta)  # cycles/step
    phases = 2 * math.pi * torch.rand(6, generator=g, dtype=torch.float64)
    t = torch.arange(steps, dtype=torch.float64)
    u = torch.sin(2 * math.pi * freqs[:, None] * t + phases[:, None]).sum(0)
    u = u / u.std()
    m = causal_conv(u, H)  # (order, steps)

    fig = figure(figsize=(12, 4))
    ax_h, ax_u = fig.subplots(1, 2, width_ratios=[1, 2])
    shown = int(1.5 * theta)
    for i in range(min(order, 5)):
        ax_h.plot(t[:shown], H[i, :shown], color=f"C{i}", label=f"m_{i}")
    ax_h.axvline(theta, color="0.5", linestyle=":", label="θ")
    ax_h.set_title(f"impulse responses (order {order}, θ = {theta:g} steps)", fontsize=10)
    ax_h.set_xlabel("steps since the impulse")
    ax_h.set_ylabel("memory m_i")
    ax_h.legend(fontsize=7, ncol=2)

    ax_u.plot(t, u, color="0.2", linewidth=1, label="input u(t)")
    for i, delay in enumerate((round(theta / 2), round(theta)), start=1):
        true = torch.cat([u.new_zeros(delay), u[: steps - delay]])
        read = legendre_readout(order, torch.tensor([delay / theta])) @ m  # (1, steps)
        rms = float((read[0] - true)[delay:].pow(2).mean().sqrt())
        ax_u.plot(t, true, color=f"C{i}", linestyle="--", linewidth=2.5, alpha=0.5,
                  label=f"u(t - {delay})")  # fmt: skip
        ax_u.plot(t, read[0], color=f"C{i}", linewidth=1, label=f"read from m_t (rms {rms:.3f})")
    ax_u.set_title("what the memory holds: the last θ steps, read back", fontsize=10)
    ax_u.set_xlabel("step t")
    ax_u.set_ylabel("signal")
    ax_u.legend(fontsize=7, ncol=3, loc="upper center")
    return fig


def lmu_paths_figure(h_fft: Tensor, h_rec: Tensor, units: int = 3) -> Figure:
    """Outputs (B, T, H) of an LMU's FFT path and recurrent path on the same input: a few hidden
    units of the first sequence overlaid (top) and the largest difference per frame (bottom)."""
    h_fft, h_rec = h_fft.detach().double().cpu(), h_rec.detach().double().cpu()
    diff = (h_fft - h_rec).abs().amax(dim=(0, 2))  # (T,)
    fig = figure(figsize=(10, 5))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for i in range(min(units, h_fft.shape[-1])):
        top.plot(h_fft[0, :, i], color=f"C{i}", linewidth=3, alpha=0.4,
                 label="FFT path" if i == 0 else None)  # fmt: skip
        top.plot(h_rec[0, :, i], color=f"C{i}", linewidth=1, linestyle="--",
                 label="recurrent path" if i == 0 else None)  # fmt: skip
    top.set_title(f"the same LMU, two paths: largest difference {float(diff.max()):.1e}",
                  fontsize=10)  # fmt: skip
    top.set_ylabel("hidden unit h_t")
    top.legend(fontsize=8)
    bottom.semilogy(diff.clamp_min(1e-12), color="C3")
    bottom.set_title("difference per frame (float32 rounding)", fontsize=10)
    bottom.set_xlabel("frame t")
    bottom.set_ylabel("max |FFT - recurrent|")
    return fig


@torch.no_grad()
def lmu_memory(model: SpeechRecognizer, wav: Tensor, block: int = 0) -> Tensor:
    """The memory m_t (T', memory_d, order) of block `block`'s LMU over one waveform (S), in
    eval mode. The LMU is stepped frame by frame (its streaming path) on the input the model
    gives it, which covers every LMU configuration."""
    lmu = model.encoder.blocks[block].lmu
    inputs: list[Tensor] = []
    hook = lmu.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(wav.reshape(1, -1).to(device), torch.tensor([wav.numel()], device=device))
    finally:
        model.train(was_training)
        hook.remove()
    x, state, memory = inputs[0], None, []  # x: (1, T', D)
    for t in range(x.shape[1]):
        _, state = lmu.step(x[:, t], state)
        memory.append(state.m[0].float().cpu())
    return torch.stack(memory)


def lmu_memory_figure(model: SpeechRecognizer, wav: Tensor, text: str, block: int = 0) -> Figure:
    """What block `block`'s LMU memory holds over one utterance: the spectrogram; every memory
    channel's input u_t (read back at delay 0); the Legendre coefficients of the busiest channel;
    and that channel's window u(t - θ') for θ' in [0, θ], read back from m_t."""
    m = lmu_memory(model, wav, block)  # (T', D, N)
    T, D, N = m.shape
    theta = model.encoder.blocks[block].lmu.theta_value
    s, hop_s = model.cfg.subsampling, model.frontend.cfg.hop_ms / 1000
    window = torch.einsum("rn,tdn->tdr", legendre_readout(N, torch.linspace(0, 1, 64)).float(), m)
    now = window[..., 0]  # (T', D)
    c = int(now.var(0).argmax())
    x0, x1 = ((s - 1) - s / 2) * hop_s, ((s - 1) - s / 2 + T * s) * hop_s  # frame edges (s)

    width = round(min(max(10, T / 30), 24), 1)
    fig = figure(figsize=(width, 10))
    axes = fig.subplots(4, 1, sharex=True)
    _spectrogram(axes[0], _frontend_log_mel(model.frontend, wav), hop_s, xlabel=False)
    axes[0].set_title(textwrap.shorten(text, int(width * 12), placeholder=" …"), fontsize=9,
                      loc="left")  # fmt: skip
    panels = [
        (now.T, (-0.5, D - 0.5), "channel", f"block {block + 1}: memory input u_t per channel"),
        (m[:, c].T, (-0.5, N - 0.5), "Legendre i", f"memory m_t of channel {c}: {N} coefficients"),
        (window[:, c].T, (0, theta * s * hop_s * 1000), "delay θ' (ms)",
         f"channel {c} read back from m_t: u(t - θ'), the last {theta:g} frames"),
    ]  # fmt: skip
    for ax, (image, (y0, y1), ylabel, title) in zip(axes[1:], panels):
        top = float(image.abs().max())
        im = ax.imshow(image.numpy(), origin="lower", aspect="auto", cmap="coolwarm",
                       extent=(x0, x1, y0, y1), vmin=-top, vmax=top)  # fmt: skip
        fig.colorbar(im, ax=ax, pad=0.01)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1].set_xlabel("time (s)")
    return fig


# --- one utterance: attention and CTC --------------------------------------------------------


def attention_weights(att: SelfAttention, x: Tensor, lengths: Tensor) -> Tensor:
    """The attention probabilities `att` uses on its input x (B, T, D) with `lengths` (B,):
    (B, H, T, T), softmax(q k^T / sqrt(Dh)) over the keys `att.allowed` permits (0 elsewhere).
    Without dropout, i.e. as in eval mode."""
    B, T, D = x.shape
    H = att.cfg.n_heads
    q, k, _ = att.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D // H)  # (B, H, T, T)
    return scores.masked_fill(~att.allowed(lengths, T), -math.inf).softmax(-1)


@dataclass
class UtterancePlots:
    attention: Path  # the PNG of the attention maps
    posteriogram: Path  # the PNG of the CTC log-probs
    weights: list[Tensor]  # per block, (H, T', T'): the attention probabilities drawn
    path: list[int]  # argmax token per encoder frame (T',)
    emitted: list[tuple[int, int]]  # (frame, token id) of each token the greedy decoder emits
    hypothesis: str  # greedy transcript


@torch.no_grad()
def utterance_plots(
    model: SpeechRecognizer, wav: Tensor, text: str, out_dir: Path, name: str = "utterance"
) -> UtterancePlots:
    """Writes `{name}-attention.png` and `{name}-posteriogram.png` for one waveform (S,) with
    reference `text`, computed by `model` (unwrapped from DDP) in eval mode."""
    device = next(model.parameters()).device
    wav_lens = torch.tensor([wav.shape[-1]], device=device)
    inputs: list[tuple[Tensor, Tensor]] = []  # what each block's attention is called with
    hooks = [
        b.att.register_forward_pre_hook(lambda _, args: inputs.append(args))
        for b in model.encoder.blocks
    ]
    was_training = model.training
    model.eval()
    try:
        log_probs, out_lens = model(wav.reshape(1, -1).to(device), wav_lens)  # (1, T', V), (1,)
        blocks = [b.att for b in model.encoder.blocks]
        weights = [attention_weights(a, x, n)[0].cpu() for a, (x, n) in zip(blocks, inputs)]
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ms = model.cfg.subsampling * model.frontend.cfg.hop_ms  # one encoder frame
    attention = save(attention_figure(weights, ms), out_dir / f"{name}-attention.png")
    lp = log_probs[0, : int(out_lens[0])].cpu()  # (T', V)
    path, emitted = greedy_path(lp)
    hyp = greedy_decode(log_probs, out_lens)[0]
    fig = posteriogram_figure(_frontend_log_mel(model.frontend, wav), lp, text, hyp,
                              model.frontend.cfg.hop_ms, model.cfg.subsampling)  # fmt: skip
    post = save(fig, out_dir / f"{name}-posteriogram.png")
    return UtterancePlots(attention, post, weights, path, emitted, hyp)


def greedy_path(lp: Tensor) -> tuple[list[int], list[tuple[int, int]]]:
    """Log-probs (T, V) -> argmax token per frame, and (frame, token) of each emitted token."""
    path = lp.argmax(-1).tolist()
    emitted = [(t, c) for t, c in enumerate(path) if c != BLANK and (t == 0 or c != path[t - 1])]
    return path, emitted


def attention_figure(weights: list[Tensor], ms: float) -> Figure:
    """One panel per block: its attention probabilities (H, T, T) averaged over heads."""
    cols = len(weights) if len(weights) <= 3 else math.ceil(math.sqrt(len(weights)))
    rows = math.ceil(len(weights) / cols)
    fig = figure(figsize=(4 * cols, 3.5 * rows + 0.5))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for i, (ax, w) in enumerate(zip(axes, weights)):
        im = ax.imshow(w.mean(0).numpy(), origin="lower", cmap="viridis", vmin=0)
        ax.set_title(f"block {i + 1} (mean of {w.shape[0]} heads)", fontsize=9)
        ax.set_xlabel(f"key frame ({ms:g} ms)", fontsize=8)
        ax.set_ylabel("query frame", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes[len(weights) :]:  # unused cells of the grid
        ax.set_axis_off()
    fig.suptitle("self-attention probabilities (rows sum to 1)", fontsize=10)
    return fig


def attention_heads_figure(weights: list[Tensor], ms: float) -> Figure:
    """One panel per block (row) and head (column) of the attention probabilities (H, T, T)."""
    heads = weights[0].shape[0]
    fig = figure(figsize=(2.6 * heads + 1, 2.4 * len(weights) + 0.6))
    axes = fig.subplots(len(weights), heads, squeeze=False)
    top = max(float(w.max()) for w in weights)
    for i, w in enumerate(weights):
        for h in range(heads):
            im = axes[i, h].imshow(w[h].numpy(), origin="lower", cmap="viridis", vmin=0, vmax=top)
            axes[i, h].set_title(f"block {i + 1}, head {h + 1}", fontsize=8)
            axes[i, h].tick_params(labelsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention probability")
    fig.supxlabel(f"key frame ({ms:g} ms)", fontsize=9)
    fig.supylabel("query frame", fontsize=9)
    fig.suptitle("self-attention per block and head (rows sum to 1)", fontsize=10)
    return fig


def posteriogram_figure(
    spec: Tensor, lp: Tensor, ref: str, hyp: str, hop_ms: float, subsampling: int
) -> Figure:
    """The log-mel spectrogram (n_mels, T) with each token the greedy decoder emits marked at its
    frame (top), over the CTC log-probs (T', V) with the argmax path as dots (bottom)."""
    T, V = lp.shape
    path, emitted = greedy_path(lp)
    hop_s, s = hop_ms / 1000, subsampling
    # encoder frame t sees log-mel frames s*t .. s*t + 2(s-1) (unpadded convolutions): centre
    centre = [(s * t + s - 1) * hop_s for t in range(T)]
    x0 = ((s - 1) - s / 2) * hop_s
    width = round(min(max(10, T / 30), 24), 1)
    fig = figure(figsize=(width, 8))
    ax_spec, ax = fig.subplots(2, 1, sharex=True, height_ratios=[2, 3])
    _spectrogram(ax_spec, spec, hop_s, xlabel=False)
    for t, c in emitted:
        ax_spec.axvline(centre[t], color="white", alpha=0.5, linewidth=0.8)
        ax_spec.text(centre[t], 0.97, _SYMBOLS[c], transform=ax_spec.get_xaxis_transform(),
                     ha="center", va="top", fontsize=8, color="white", weight="bold")  # fmt: skip
    chars = int((width - 1.5) * 13)  # 9-point monospace characters above the axes
    ax_spec.set_title(
        f"REF: {textwrap.shorten(ref, chars, placeholder=' …') or '-'}\n"
        f"HYP: {textwrap.shorten(hyp, chars, placeholder=' …') or '-'}",
        fontsize=9, loc="left", family="monospace",
    )  # fmt: skip
    im = ax.imshow(
        lp.T.clamp_min(LOG_PROB_FLOOR).numpy(), origin="lower", aspect="auto", cmap="magma",
        vmin=LOG_PROB_FLOOR, vmax=0, extent=(x0, x0 + T * s * hop_s, -0.5, V - 0.5),
    )  # fmt: skip
    fig.colorbar(im, ax=ax, label="log p", pad=0.01)
    ax.plot(centre, path, "o", color="cyan", ms=2, label="argmax (greedy path)")
    for t, c in emitted:
        ax.annotate(_SYMBOLS[c], (centre[t], c), xytext=(0, 4), textcoords="offset points",
                    ha="center", fontsize=7, color="white", weight="bold")  # fmt: skip
    ax.set_yticks(range(V), _SYMBOLS, fontsize=7)
    ax.set_ylabel("token")
    ax.set_xlabel(f"time (s); one encoder frame = {s * hop_ms:g} ms")
    ax.set_title("CTC posteriogram (log p per encoder frame)", fontsize=9, loc="left")
    ax.legend(loc="upper right", fontsize=7)
    return fig


def _say(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
