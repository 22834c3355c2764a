"""LMU layer: FFT path vs recurrent path vs nn.LSTM vs a Transformer encoder layer of equal width
(forward + backward), and the memory update alone (FFT convolution vs the sequential loop)."""

from __future__ import annotations

import argparse

import torch

from lmu_asr.bench.measure import Measurement, interleaved
from lmu_asr.lmu import LMU, causal_conv


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--T", type=int, nargs="+", default=[250, 1000, 4000], help="lengths")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--long-repeats", type=int, default=3, help="repeats of O(T)-step paths, T>1000")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512, help="input size = hidden size")
    p.add_argument("--memory-d", type=int, default=1)
    p.add_argument("--order", type=int, default=256)
    p.add_argument("--theta", type=float, default=1000.0)
    p.add_argument("--heads", type=int, default=8, help="Transformer layer's attention heads")


def sequential_memory(u: torch.Tensor, Ad: torch.Tensor, Bd: torch.Tensor) -> torch.Tensor:
    """m_t = Ad m_{t-1} + Bd u_t, one frame after another: u (B, D, T) -> m (B, D, N, T)."""
    B, D, T = u.shape
    m = u.new_zeros(B * D, Ad.shape[0])
    out = []
    for u_t in u.reshape(B * D, T).unbind(1):
        m = torch.addmm(u_t[:, None] * Bd, m, Ad.T)
        out.append(m)
    return torch.stack(out, -1).reshape(B, D, -1, T)


def run(args: argparse.Namespace, device: torch.device) -> list[Measurement]:
    B, D, H = args.batch, args.hidden, args.hidden
    shape = dict(memory_d=args.memory_d, order=args.order, theta=args.theta)
    torch.manual_seed(0)
    fft = LMU(D, H, **shape, parallel=True).to(device)
    rec = LMU(D, H, **shape, parallel=False).to(device)
    rec.load_state_dict(fft.state_dict())  # same weights, same function
    lstm = torch.nn.LSTM(D, H, batch_first=True).to(device)
    layer = torch.nn.TransformerEncoderLayer(H, args.heads, 4 * H, 0.0, batch_first=True)
    layer = layer.to(device)
    Ad, Bd = fft.discretized(device, torch.float32)

    def fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> None:
        module.zero_grad(set_to_none=True)
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    def shared(x: torch.Tensor, m: torch.Tensor) -> None:
        # the work both LMU paths do besides the memory: u and h projections, tanh
        fft.zero_grad(set_to_none=True)
        u, h = fft.W_u(x), torch.tanh(fft.W_m(m) + fft.W_x(x))
        (u.sum() + h.sum()).backward()

    out: list[Measurement] = []
    base = dict(batch=B, input_size=D, hidden_size=H, **shape, device=device.type)
    for T in args.T:
        x = torch.randn(B, T, D, device=device)
        m = torch.randn(B, T, args.memory_d * args.order, device=device, requires_grad=True)
        u = torch.randn(B, args.memory_d, T, device=device)
        H_T = fft._impulse_response(T, device, torch.float32)
        slow = args.long_repeats if T > 1000 else args.repeats
        fast = interleaved(
            {
                "lmu_fft": lambda x=x: fwd_bwd(fft, x),
                "shared_projections": lambda x=x, m=m: shared(x, m),
                "transformer_layer": lambda x=x: fwd_bwd(layer, x),
                "memory_fft": lambda u=u, H_T=H_T: causal_conv(u, H_T),
            },
            args.repeats,
            device=device,
        )
        seq = interleaved(
            {
                "lmu_recurrent": lambda x=x: fwd_bwd(rec, x),
                "lstm": lambda x=x: fwd_bwd(lstm, x),
                "memory_sequential": lambda u=u: sequential_memory(u, Ad, Bd),
            },
            slow,
            device=device,
        )
        secs = fast | seq
        fft_s = Measurement("lmu_fft", "s", secs["lmu_fft"], {"T": T} | base)
        out.append(fft_s)
        for name, what in [
            ("lmu_recurrent", "the same LMU, memory by the sequential recurrence"),
            ("lstm", "nn.LSTM of the same width"),
            ("transformer_layer", f"nn.TransformerEncoderLayer, {args.heads} heads, ff 4x"),
            ("shared_projections", "W_u, W_x, W_m and tanh alone: paid by both LMU paths"),
        ]:
            mm = Measurement(name, "s", secs[name], {"T": T} | base, note=what)
            mm.baseline, mm.ratio = "lmu_fft", mm.median / fft_s.median
            mm.ratio_is = "this time / lmu_fft time (> 1: the FFT path is faster)"
            if name == "lstm" and T == 1000:
                mm.bar, mm.met = ">= 5", mm.ratio >= 5
            out.append(mm)
        conv = Measurement("memory_fft", "s", secs["memory_fft"], {"T": T} | base)
        conv.note = "the memory update alone (forward): causal convolution by FFT"
        loop = Measurement("memory_sequential", "s", secs["memory_sequential"], {"T": T} | base)
        loop.note = "the memory update alone (forward): m_t = Ad m_t-1 + Bd u_t, frame by frame"
        loop.baseline, loop.ratio = "memory_fft", loop.median / conv.median
        loop.ratio_is = "sequential time / FFT time"
        out += [conv, loop]
    return out
