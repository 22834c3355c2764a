"""Attention-enhanced LMU encoder with a CTC head.

log-mel (B, T, F) -> subsampling -> N x Block -> LayerNorm -> Linear -> log-softmax (B, T', V)
Block:  x = x + SelfAttention(LN(x))      (key-padding mask; full, causal or windowed context)
        x = x + LMU(LN(x))                (causal memory; optionally + a time-reversed LMU)
        x = x + FeedForward(LN(x))        (optional)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmu_asr.features import FeatureConfig, LogMel, SpecAugment
from lmu_asr.lmu import LMU
from lmu_asr.text import VOCAB

ATTENTION_KINDS = ("full", "causal", "window")


@dataclass
class ModelConfig:
    """Hydra group `model`; presets in conf/model/*.yaml (lmu_tiny, lmu_small, lmu_base)."""

    name: str = "lmu_small"
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    memory_d: int = 8
    order: int = 32
    theta: float = 32.0  # memory window in encoder frames (after subsampling)
    hidden_to_memory: bool = False
    memory_to_memory: bool = False
    trainable_theta: bool = False
    reverse_lmu: bool = False  # add a time-reversed LMU per block (not streamable)
    subsampling: int = 4  # 1, 2 or 4
    conv_channels: int = 64
    attention: str = "full"  # full | causal | window
    left_context: int = 16  # frames, attention="window" only
    right_context: int = 0  # frames, attention="window" only
    ff_mult: int = 4  # 0 disables the feed-forward sub-layer
    dropout: float = 0.1
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        positive = ("d_model", "n_layers", "n_heads", "memory_d", "order", "conv_channels")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.theta <= 0:
            raise ValueError(f"model.theta must be > 0, got {self.theta}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by "
                f"model.n_heads ({self.n_heads})"
            )
        if self.subsampling not in (1, 2, 4):
            raise ValueError(f"model.subsampling must be 1, 2 or 4, got {self.subsampling}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"model.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}"
            )
        if self.left_context < 0 or self.right_context < 0:
            raise ValueError("model.left_context and model.right_context must be >= 0")
        if self.ff_mult < 0:
            raise ValueError(f"model.ff_mult must be >= 0, got {self.ff_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


def padding_mask(lengths: Tensor, T: int) -> Tensor:
    """(B,) lengths -> (B, T) bool, True on padded frames."""
    return torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each sequence's valid frames in place of (B, T, D); padding stays at the end."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)[None, :]  # (1, T)
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # (B, T)
    return x.gather(1, idx[..., None].expand_as(x))


class ConvSubsampling(nn.Module):
    """(B, T, F) -> (B, T // s, D) with stride-2 3x3 convolutions; no padding, so every valid
    output frame sees only valid input frames."""

    def __init__(self, n_mels: int, d_model: int, factor: int, channels: int):
        super().__init__()
        self.factor = factor
        layers: list[nn.Module] = []
        c_in, f = 1, n_mels
        for _ in range({1: 0, 2: 1, 4: 2}[factor]):
            layers += [nn.Conv2d(c_in, channels, 3, stride=2), nn.GELU()]
            c_in, f = channels, (f - 1) // 2
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in * f, d_model)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        for _ in range({1: 0, 2: 1, 4: 2}[self.factor]):
            lengths = (lengths - 1) // 2
        return lengths

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv(x[:, None])  # (B, C, T', F')
        x = x.transpose(1, 2).flatten(2)  # (B, T', C * F')
        return self.proj(x), self.output_lengths(lengths)  # (B, T', D), (B,)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def allowed(self, lengths: Tensor, T: int) -> Tensor:
        """(B, 1, T, T) bool: query i may attend key j. A query always sees itself, so no row is
        empty (padded queries would otherwise give NaN)."""
        i = torch.arange(T, device=lengths.device)[:, None]
        j = torch.arange(T, device=lengths.device)[None, :]
        ok = ~padding_mask(lengths, T)[:, None, None, :]  # keys, (B, 1, 1, T)
        if self.cfg.attention == "causal":
            ok = ok & (j <= i)
        elif self.cfg.attention == "window":
            ok = ok & (j >= i - self.cfg.left_context) & (j <= i + self.cfg.right_context)
        return ok | (i == j)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        B, T, D = x.shape
        H = self.cfg.n_heads
        q, k, v = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        p = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed(lengths, T), dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        lmu_args = dict(
            input_size=d,
            hidden_size=d,
            memory_d=cfg.memory_d,
            order=cfg.order,
            theta=cfg.theta,
            hidden_to_memory=cfg.hidden_to_memory,
            memory_to_memory=cfg.memory_to_memory,
            trainable_theta=cfg.trainable_theta,
        )
        self.norm_att, self.att = nn.LayerNorm(d), SelfAttention(cfg)
        self.norm_lmu, self.lmu = nn.LayerNorm(d), LMU(**lmu_args)
        self.lmu_rev = LMU(**lmu_args) if cfg.reverse_lmu else None
        self.norm_ff = nn.LayerNorm(d) if cfg.ff_mult else None
        self.ff = (
            nn.Sequential(
                nn.Linear(d, cfg.ff_mult * d),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.ff_mult * d, d),
            )
            if cfg.ff_mult
            else None
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        pad = padding_mask(lengths, x.shape[1])[..., None]  # (B, T, 1)
        x = x + self.drop(self.att(self.norm_att(x), lengths))
        h = self.norm_lmu(x).masked_fill(pad, 0.0)
        m, _ = self.lmu(h, lengths)
        if self.lmu_rev is not None:
            m_rev, _ = self.lmu_rev(reverse_padded(h, lengths), lengths)
            m = m + reverse_padded(m_rev, lengths)
        x = x + self.drop(m)
        if self.ff is not None:
            x = x + self.drop(self.ff(self.norm_ff(x)))
        return x.masked_fill(pad, 0.0)  # (B, T, D)


class Encoder(nn.Module):
    """Features (B, T, n_mels) -> CTC log-probs (B, T', V) and output lengths (B,)."""

    def __init__(self, cfg: ModelConfig, n_mels: int, vocab_size: int = len(VOCAB)):
        super().__init__()
        self.cfg = cfg
        self.subsample = ConvSubsampling(n_mels, cfg.d_model, cfg.subsampling, cfg.conv_channels)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def forward(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths = self.subsample(feats, feat_lens)  # (B, T', D), (B,)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, lengths, use_reentrant=False)
            else:
                x = block(x, lengths)
        logits = self.head(self.norm(x))  # (B, T', V)
        return logits.float().log_softmax(-1), lengths


class SpeechRecognizer(nn.Module):
    """Waveforms -> CTC log-probs: log-mel frontend (its normalisation statistics are buffers,
    saved with the weights), SpecAugment in training mode, then the encoder."""

    def __init__(self, cfg: ModelConfig, features: FeatureConfig, sample_rate: int = 16000):
        super().__init__()
        self.cfg = cfg
        self.frontend = LogMel(features, sample_rate)
        self.specaug = SpecAugment(features)
        self.encoder = Encoder(cfg, features.n_mels)

    def forward(self, wav: Tensor, wav_lens: Tensor) -> tuple[Tensor, Tensor]:
        feats, feat_lens = self.frontend(wav, wav_lens)  # (B, T, F), (B,)
        feats = self.specaug(feats, feat_lens)
        return self.encoder(feats, feat_lens)  # (B, T', V), (B,)
