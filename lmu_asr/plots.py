"""Figures for a training run (MLflow artifacts, the notebook): learning curves from
metrics.jsonl; for one utterance, the self-attention maps and the CTC posteriogram.

Figures are `matplotlib.figure.Figure`s saved with the Agg renderer; pyplot is never imported, so
plotting changes no global state and is safe inside a training process.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from lmu_asr.decode import greedy_decode
from lmu_asr.model import SelfAttention, SpeechRecognizer
from lmu_asr.text import BLANK, VOCAB
from lmu_asr.tracking import read_jsonl

DPI = 100
LOG_PROB_FLOOR = -15.0  # colour scale of the posteriogram; anything less likely looks the same
_SYMBOLS = ["∅", "␣", *VOCAB[2:]]  # blank and space made visible


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
    """PNG (800 x 600) of training loss (log scale) and learning rate vs step, above dev WER/CER
    vs step; a panel without points yet says so."""
    series = read_metrics(metrics_jsonl)
    fig = Figure(figsize=(8, 6), dpi=DPI, layout="constrained")
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
    ax_dev.grid(alpha=0.3)
    fig.savefig(out, dpi=DPI)
    return Path(out)


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
    attention = _draw_attention(weights, ms, out_dir / f"{name}-attention.png")
    n = int(out_lens[0])
    lp = log_probs[0, :n].cpu()  # (T', V)
    path = lp.argmax(-1).tolist()
    emitted = [(t, c) for t, c in enumerate(path) if c != BLANK and (t == 0 or c != path[t - 1])]
    hyp = greedy_decode(log_probs, out_lens)[0]
    post = out_dir / f"{name}-posteriogram.png"
    _draw_posteriogram(lp, path, emitted, text, hyp, ms, post)
    return UtterancePlots(attention, post, weights, path, emitted, hyp)


def _draw_attention(weights: list[Tensor], ms: float, out: Path) -> Path:
    """One panel per block: its attention probabilities (H, T, T) averaged over heads."""
    cols = len(weights) if len(weights) <= 3 else math.ceil(math.sqrt(len(weights)))
    rows = math.ceil(len(weights) / cols)
    fig = Figure(figsize=(4 * cols, 3.5 * rows + 0.5), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for i, (ax, w) in enumerate(zip(axes, weights)):
        mean = w.mean(0).numpy()  # (T, T)
        im = ax.imshow(mean, origin="lower", cmap="viridis", vmin=0)
        ax.set_title(f"block {i + 1} (mean of {w.shape[0]} heads)", fontsize=9)
        ax.set_xlabel(f"key frame ({ms:g} ms)", fontsize=8)
        ax.set_ylabel("query frame", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes[len(weights) :]:  # unused cells of the grid
        ax.set_axis_off()
    fig.suptitle("self-attention probabilities (rows sum to 1)", fontsize=10)
    fig.savefig(out, dpi=DPI)
    return out


def _draw_posteriogram(
    lp: Tensor, path: list[int], emitted: list[tuple[int, int]], ref: str, hyp: str, ms: float,
    out: Path,
) -> None:  # fmt: skip
    """log p (T, V) as an image, the argmax path as dots, each emitted token labelled."""
    T, V = lp.shape
    fig = Figure(figsize=(round(min(max(10, T / 30), 24), 1), 5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(
        lp.T.clamp_min(LOG_PROB_FLOOR).numpy(), origin="lower", aspect="auto", cmap="magma",
        vmin=LOG_PROB_FLOOR, vmax=0,
    )  # fmt: skip
    fig.colorbar(im, ax=ax, label="log p", pad=0.01)
    ax.plot(range(T), path, "o", color="cyan", ms=2, label="argmax (greedy path)")
    for t, c in emitted:
        ax.annotate(_SYMBOLS[c], (t, c), xytext=(0, 4), textcoords="offset points",
                    ha="center", fontsize=7, color="white", weight="bold")  # fmt: skip
    ax.set_yticks(range(V), _SYMBOLS, fontsize=7)
    ax.set_xlabel(f"encoder frame ({ms:g} ms)")
    ax.legend(loc="upper right", fontsize=7)
    width = int((fig.get_figwidth() - 1.5) * 13)  # 9-point monospace characters above the axes
    ax.set_title(
        f"REF: {textwrap.shorten(ref, width, placeholder=' …') or '-'}\n"
        f"HYP: {textwrap.shorten(hyp, width, placeholder=' …') or '-'}",
        fontsize=9, loc="left", family="monospace",
    )  # fmt: skip
    fig.savefig(out, dpi=DPI)


def _say(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
