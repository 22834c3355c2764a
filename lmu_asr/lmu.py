"""Legendre Memory Unit (Voelker et al. 2019), with the FFT path of Chilkuri & Eliasmith (2021).

    u_t = W_u x_t + b_u [+ e_h h_{t-1}] [+ e_m m_{t-1}]    memory_d scalar channels
    m_t = Ad m_{t-1} + Bd u_t                              per channel, m_t: (memory_d, order)
    h_t = tanh(W_m m_t + W_x x_t + b)

(Ad, Bd) is the zero-order-hold discretisation (dt = 1) of the Legendre delay system with a window
of theta steps. The hidden map is feed-forward, so when u depends on x only (no hidden_to_memory,
memory_to_memory or trainable theta) the memory is a causal convolution of u with the impulse
response H[:, k] = Ad^k Bd, computed with FFTs in O(T log T). The recurrent path computes the same
function step by step with the same weights: it is what streaming inference runs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


def legendre_delay(order: int, theta: float) -> tuple[Tensor, Tensor]:
    """Continuous system dm/dt = A m + B u (float64, A: (order, order), B: (order,))."""
    if isinstance(order, bool) or int(order) != order or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    if not math.isfinite(theta) or theta <= 0:
        raise ValueError(f"theta must be a finite number > 0, got {theta!r}")
    i = torch.arange(int(order), dtype=torch.float64)
    r, c = i[:, None], i[None, :]
    A = (2 * r + 1) * torch.where(r < c, -1.0, (-1.0) ** (r - c + 1))
    B = (2 * i + 1) * (-1.0) ** i
    return A / theta, B / theta


def zoh(A: Tensor, B: Tensor, dt: float = 1.0) -> tuple[Tensor, Tensor]:
    """Zero-order hold: expm([[A, B], [0, 0]] dt) = [[Ad, Bd], [0, 1]]. float64, differentiable."""
    if not dt > 0:
        raise ValueError(f"dt must be > 0, got {dt!r}")
    n = A.shape[-1]
    top = torch.cat([A.double(), B.double()[:, None]], dim=1)  # (n, n + 1)
    M = torch.cat([top, top.new_zeros(1, n + 1)], dim=0)  # (n + 1, n + 1)
    E = torch.linalg.matrix_exp(M * dt)
    return E[:n, :n], E[:n, n]


def _powers(Ad: Tensor, x: Tensor, T: int) -> Tensor:
    """[x, Ad x, ..., Ad^(T-1) x] as (T, N, K) for x (N, K), by doubling: ~log2(T) matmuls."""
    out, P = x[None], Ad  # invariant: P = Ad^len(out)
    while out.shape[0] < T:
        out = torch.cat([out, P @ out])
        P = P @ P
    return out[:T]


def impulse_response(Ad: Tensor, Bd: Tensor, T: int) -> Tensor:
    """H[:, k] = Ad^k Bd for k < T: (order, T)."""
    return _powers(Ad, Bd[:, None], T)[..., 0].T


def _fft_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: FFT sizes with a large prime factor are many times slower."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def causal_conv(u: Tensor, H: Tensor) -> Tensor:
    """m[..., :, t] = sum_{s<=t} H[:, t-s] u[..., s] by FFT: u (..., T), H (N, T) -> (..., N, T)."""
    T = u.shape[-1]
    n = _fft_len(2 * T)  # >= 2T - 1: linear, not circular, convolution
    U = torch.fft.rfft(u, n=n)[..., None, :]  # (..., 1, F)
    return torch.fft.irfft(U * torch.fft.rfft(H, n=n), n=n)[..., :T]


def _fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class LMUState(NamedTuple):
    h: Tensor  # (B, hidden_size)
    m: Tensor  # (B, memory_d, order)


class LMU(nn.Module):
    """LMU layer over (B, T, input_size) sequences; see the module docstring for the equations.

    parallel=None picks the FFT path whenever the configuration allows it, True demands it,
    False forces the recurrence. The memory always runs in float32 or wider, also under autocast.
    Outputs on frames at or past lengths[b] are unspecified (both paths are causal, so the valid
    frames are exact); the returned state is the one after frame lengths[b] - 1. Pass state=None
    for a zero state: the FFT path then skips the initial-state term (~ one N x N matmul a frame).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        memory_d: int,
        order: int,
        theta: float,
        hidden_to_memory: bool = False,
        memory_to_memory: bool = False,
        trainable_theta: bool = False,
        parallel: bool | None = None,
    ) -> None:
        super().__init__()
        sizes = {"input_size": input_size, "hidden_size": hidden_size, "memory_d": memory_d}
        for name, v in sizes.items():
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v!r}")
        A, B = legendre_delay(order, theta)
        flags = {
            "hidden_to_memory": hidden_to_memory,
            "memory_to_memory": memory_to_memory,
            "trainable_theta": trainable_theta,
        }
        recurrent_only = [k for k, v in flags.items() if v]
        if parallel and recurrent_only:
            raise ValueError(
                f"parallel=True (FFT path) cannot run with {', '.join(recurrent_only)}=True; "
                "use parallel=None or False for the recurrent path"
            )
        self._use_fft = not recurrent_only if parallel is None else bool(parallel)
        self.hidden_size, self.memory_d, self.order = hidden_size, memory_d, order

        # Derived constants live outside the state dict and stay float64 on the CPU
        # (model.half() must not touch them); _cache keeps copies per (device, dtype).
        self._A, self._B = A * theta, B * theta  # theta = 1
        self._cache: dict[tuple, object] = {}
        if trainable_theta:
            self.theta: float | nn.Parameter = nn.Parameter(torch.tensor(float(theta)))
        else:
            self.theta = float(theta)

        DN = memory_d * order
        self.W_u = nn.Linear(input_size, memory_d)  # incl. b_u
        self.e_h = nn.Linear(hidden_size, memory_d, bias=False) if hidden_to_memory else None
        self.e_m = nn.Linear(DN, memory_d, bias=False) if memory_to_memory else None
        self.W_m = nn.Linear(DN, hidden_size, bias=False)
        self.W_x = nn.Linear(input_size, hidden_size)  # incl. b
        for lin in filter(None, (self.W_u, self.e_h, self.W_m, self.W_x)):
            nn.init.xavier_uniform_(lin.weight)
        for bias in (self.W_u.bias, self.W_x.bias):
            nn.init.zeros_(bias)
        if self.e_m is not None:  # start as the pure delay line: random m -> u feedback can be
            nn.init.zeros_(self.e_m.weight)  # unstable (|eig(Ad + Bd e_m)| > 1) and blow up m

    @property
    def use_fft(self) -> bool:
        return self._use_fft

    @property
    def theta_value(self) -> float:
        return float(self.theta.detach()) if isinstance(self.theta, Tensor) else self.theta

    def extra_repr(self) -> str:
        path = "fft" if self._use_fft else "recurrent"
        return f"memory_d={self.memory_d}, order={self.order}, theta={self.theta_value:g}, {path=}"

    def initial_state(self, batch: int, device=None, dtype=None) -> LMUState:
        h = torch.zeros(batch, self.hidden_size, device=device, dtype=dtype)
        m = torch.zeros(batch, self.memory_d, self.order, device=device, dtype=dtype)
        return LMUState(h, m)

    def discretized(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(Ad, Bd) on device in dtype; differentiable in theta when it is trainable."""
        theta = self.theta
        if isinstance(theta, Tensor) and theta.requires_grad and torch.is_grad_enabled():
            Ad, Bd = zoh(self._A.to(device) / theta.double(), self._B.to(device) / theta.double())
            return Ad.to(dtype), Bd.to(dtype)
        # Cached; in-place updates of a trainable theta (optimizer, load_state_dict) bump _version.
        version = (theta._version, theta.data_ptr()) if isinstance(theta, Tensor) else None
        hit = self._cache.get(("AdBd", device, dtype))
        if hit is None or hit[0] != version:
            th = self.theta_value
            Ad, Bd = (t.to(device, dtype) for t in zoh(self._A / th, self._B / th))
            hit = self._cache["AdBd", device, dtype] = (version, Ad, Bd)
        return hit[1], hit[2]

    def _impulse_response(self, T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """H[:, :T] (order, T), built in float64 and kept for the longest T seen so far."""
        H = self._cache.get(("H", device, dtype))
        if H is None or H.shape[1] < T:
            Ad, Bd = self.discretized(torch.device("cpu"), torch.float64)
            H = self._cache["H", device, dtype] = impulse_response(Ad, Bd, T).to(device, dtype)
        return H[:, :T]

    def forward(
        self, x: Tensor, lengths: Tensor | None = None, state: LMUState | None = None
    ) -> tuple[Tensor, LMUState]:
        """x (B, T, input_size) -> h (B, T, hidden_size), state after each sequence's last frame."""
        u = self.W_u(x)  # (B, T, D)
        xw = self.W_x(x)  # (B, T, H)
        if self._use_fft:
            m = self._memory_fft(u, None if state is None else state.m)  # (B, T, D, N)
            h = torch.tanh(self.W_m(m.to(u.dtype).flatten(2)) + xw)  # (B, T, H)
        else:
            h, m = self._recurrence(u, xw, state)
        return h, self._final_state(h, m, lengths, state)

    def step(self, x_t: Tensor, state: LMUState | None = None) -> tuple[Tensor, LMUState]:
        """One frame of streaming inference: x_t (B, input_size) -> h_t (B, hidden_size)."""
        h, m = self._recurrence(self.W_u(x_t)[:, None], self.W_x(x_t)[:, None], state)
        return h[:, 0], LMUState(h[:, 0], m[:, 0])

    def _memory_fft(self, u: Tensor, m0: Tensor | None) -> Tensor:
        """u (B, T, D) -> m (B, T, D, N) in float32 or wider; m0 (B, D, N) is m_{-1}."""
        B, T, D = u.shape
        with torch.autocast(u.device.type, enabled=False):
            u = _fp32(u)
            H = self._impulse_response(T, u.device, u.dtype)  # (N, T)
            m = causal_conv(u.transpose(1, 2), H).permute(0, 3, 1, 2)  # (B, T, D, N)
            if m0 is not None:  # zero input response: m_t += Ad^(t+1) m_{-1}
                Ad, _ = self.discretized(u.device, u.dtype)
                m0 = _fp32(m0).reshape(B * D, self.order).T  # (N, B*D)
                free = _powers(Ad, Ad @ m0, T)  # (T, N, B*D)
                m = m + free.reshape(T, self.order, B, D).permute(2, 0, 3, 1)
        return m

    def _recurrence(self, u: Tensor, xw: Tensor, state: LMUState | None) -> tuple[Tensor, Tensor]:
        """u (B, T, D), xw = W_x x + b (B, T, H) -> h (B, T, H), m (B, T, D, N)."""
        B, T, D = u.shape
        N, out_dtype = self.order, u.dtype
        h_in_loop = self.e_h is not None  # otherwise h for all t is one matmul after the loop
        feedback = self.e_h is not None or self.e_m is not None
        with torch.autocast(u.device.type, enabled=False):
            u, xw = _fp32(u), _fp32(xw)
            Ad, Bd = self.discretized(u.device, u.dtype)
            AdT = Ad.T
            if state is None:
                state = self.initial_state(B, u.device, u.dtype)
            h, m = state.h.to(u.dtype), state.m.to(u.dtype).reshape(B * D, N)
            if feedback:
                e_h = self.e_h.weight.to(u.dtype).T if self.e_h is not None else None
                e_m = self.e_m.weight.to(u.dtype).T if self.e_m is not None else None
                W_m = self.W_m.weight.to(u.dtype).T
            else:  # Bd u_t for every t, time-major: (T, B*D, N)
                drives = (u.transpose(0, 1)[..., None] * Bd).reshape(T, B * D, N).unbind(0)
            # unbind, not indexing in the loop: the backward of x[t] allocates a zero tensor
            # of x's full size per step (quadratic in T); unbind's backward is one stack.
            us, xws = u.unbind(1), xw.unbind(1)
            ms, hs = [], []
            for t in range(T):
                if feedback:
                    u_t = us[t]  # (B, D)
                    if e_h is not None:
                        u_t = torch.addmm(u_t, h, e_h)
                    if e_m is not None:
                        u_t = torch.addmm(u_t, m.reshape(B, D * N), e_m)
                    drive = (u_t[..., None] * Bd).reshape(B * D, N)
                else:
                    drive = drives[t]
                m = torch.addmm(drive, m, AdT)  # m_t = Ad m_{t-1} + Bd u_t, rows (b, d)
                ms.append(m.reshape(B, D, N))
                if h_in_loop:
                    h = torch.tanh(torch.addmm(xws[t], m.reshape(B, D * N), W_m))
                    hs.append(h)
            m_all = torch.stack(ms, 1)  # (B, T, D, N)
        if h_in_loop:
            return torch.stack(hs, 1), m_all
        return torch.tanh(self.W_m(m_all.to(out_dtype).flatten(2)) + xw.to(out_dtype)), m_all

    def _final_state(
        self, h: Tensor, m: Tensor, lengths: Tensor | None, state: LMUState | None
    ) -> LMUState:
        """State after frame lengths[b] - 1 (the input state where lengths[b] == 0)."""
        if lengths is None:
            return LMUState(h[:, -1], m[:, -1])
        B = h.shape[0]
        lengths = lengths.to(h.device)
        last = (lengths - 1).clamp(min=0)
        rows = torch.arange(B, device=h.device)
        h_last, m_last = h[rows, last], m[rows, last]  # (B, H), (B, D, N)
        if state is None:
            state = self.initial_state(B, h.device, h.dtype)
        empty = lengths == 0
        h_last = torch.where(empty[:, None], state.h.to(h_last.dtype), h_last)
        m_last = torch.where(empty[:, None, None], state.m.to(m_last.dtype), m_last)
        return LMUState(h_last, m_last)
