import math

import pytest
import torch

from lmu_asr.lmu import LMU, causal_conv, impulse_response, legendre_delay, zoh

ALL_FLAGS = dict(hidden_to_memory=True, memory_to_memory=True, trainable_theta=True)


def pair(*args, **kwargs) -> tuple[LMU, LMU]:
    """The same weights on the FFT path and on the recurrent path."""
    torch.manual_seed(0)
    fft = LMU(*args, **kwargs, parallel=True)
    rec = LMU(*args, **kwargs, parallel=False)
    rec.load_state_dict(fft.state_dict())
    assert fft.use_fft and not rec.use_fft
    return fft, rec


def make(flags: dict, **kwargs) -> LMU:
    torch.manual_seed(0)
    return LMU(6, 10, 2, 8, 12.0, **flags, **kwargs)


def recurrence(Ad: torch.Tensor, Bd: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """m_t = Ad m_{t-1} + Bd u_t, written out: u (T,) -> m (order, T)."""
    m, ms = torch.zeros_like(Bd), []
    for u_t in u:
        m = Ad @ m + Bd * u_t
        ms.append(m)
    return torch.stack(ms, 1)


def test_zoh_matches_reference_vectors():
    Ad, Bd = zoh(*legendre_delay(4, 10.0))
    Ad_ref = [
        [0.894225, -0.083659, -0.079576, -0.039790],
        [0.250976, 0.722825, -0.265049, -0.136422],
        [-0.397881, 0.441749, 0.461366, -0.290828],
        [0.278532, -0.318318, 0.407160, 0.433876],
    ]
    Bd_ref = [0.105775, -0.250976, 0.397881, -0.278532]
    assert Ad.dtype == Bd.dtype == torch.float64 and Bd.shape == (4,)
    torch.testing.assert_close(Ad, torch.tensor(Ad_ref, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(Bd, torch.tensor(Bd_ref, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("T", [50, 53])  # 2 * 53 has a large prime factor: padded FFT length
def test_fft_convolution_equals_recurrence_float64(T):
    Ad, Bd = zoh(*legendre_delay(6, 20.0))
    u = torch.randn(T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = causal_conv(u, impulse_response(Ad, Bd, T))
    assert m.shape == (6, T)
    assert (m - recurrence(Ad, Bd, u)).abs().max() < 1e-12


def test_paths_agree_float64():
    fft, rec = pair(5, 7, 3, 16, 40.0)
    x = torch.randn(2, 120, 5, dtype=torch.float64)
    (h1, s1), (h2, s2) = fft.double()(x), rec.double()(x)
    assert h1.dtype == torch.float64
    assert (h1 - h2).abs().max() < 1e-10 and (s1.m - s2.m).abs().max() < 1e-10


def test_paths_agree_fp32_T1000():
    fft, rec = pair(16, 32, 2, 64, 300.0)
    x = torch.randn(2, 1000, 16)
    with torch.no_grad():
        (h1, s1), (h2, s2) = fft(x), rec(x)
    assert h1.shape == (2, 1000, 32) and s1.m.shape == (2, 2, 64)
    assert (h1 - h2).abs().max() <= 1e-5
    assert (s1.m - s2.m).abs().max() <= 1e-5 and (s1.h - s2.h).abs().max() <= 1e-5


@pytest.mark.parametrize("flags", [{}, ALL_FLAGS], ids=["fft", "recurrent_all_flags"])
def test_step_streaming_equals_forward(flags):
    lmu = make(flags)
    x = torch.randn(3, 40, 6)
    with torch.no_grad():
        h_full, s_full = lmu(x)
        state, hs = None, []
        for t in range(x.shape[1]):
            h_t, state = lmu.step(x[:, t], state)
            hs.append(h_t)
    torch.testing.assert_close(torch.stack(hs, 1), h_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.m, s_full.m, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "flags,parallel",
    [({}, True), ({}, False), (ALL_FLAGS, None)],
    ids=["fft", "recurrent", "recurrent_all_flags"],
)
def test_chunked_forward_with_state_equals_full(flags, parallel):
    lmu = make(flags, parallel=parallel)
    x = torch.randn(2, 100, 6)
    with torch.no_grad():
        h_full, s_full = lmu(x)
        state, hs, t = None, [], 0
        for n in (5, 40, 1, 17, 37):  # growing and shrinking chunk lengths
            h, state = lmu(x[:, t : t + n], state=state)
            hs.append(h)
            t += n
    torch.testing.assert_close(torch.cat(hs, 1), h_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.m, s_full.m, atol=1e-5, rtol=0)


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0])
def test_memory_is_a_delay_line(r):
    order, theta, T = 12, 100, 1000
    Ad, Bd = zoh(*legendre_delay(order, theta))
    t = torch.arange(T, dtype=torch.float64)
    u = torch.sin(2 * math.pi * t / 250)
    m = causal_conv(u, impulse_response(Ad, Bd, T))  # (order, T)
    # shifted Legendre polynomials P~_i(r) = (-1)^i sum_j C(i,j) C(i+j,j) (-r)^j
    P = [
        (-1) ** i * sum(math.comb(i, j) * math.comb(i + j, j) * (-r) ** j for j in range(i + 1))
        for i in range(order)
    ]
    decoded = torch.tensor(P, dtype=torch.float64) @ m  # (T,)
    target = torch.sin(2 * math.pi * (t - r * theta) / 250)
    rmse = (decoded - target)[theta:].pow(2).mean().sqrt()
    assert rmse < 0.02


@pytest.mark.parametrize(
    "flags,parallel",
    [({}, True), ({}, False), (ALL_FLAGS, None)],
    ids=["fft", "recurrent", "recurrent_all_flags"],
)
def test_padded_batch_equals_each_sequence_alone(flags, parallel):
    lmu = make(flags, parallel=parallel)
    lengths = torch.tensor([30, 12, 1, 0])
    x = 10 * torch.randn(4, 30, 6)  # padding is garbage, not zeros
    with torch.no_grad():
        h, state = lmu(x, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            if n == 0:
                assert state.h[b].abs().max() == 0 and state.m[b].abs().max() == 0
                continue
            h_b, s_b = lmu(x[b : b + 1, :n])
            torch.testing.assert_close(h[b, :n], h_b[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(state.h[b], s_b.h[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(state.m[b], s_b.m[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("flags", [{}, ALL_FLAGS], ids=["fft", "recurrent_all_flags"])
def test_gradients_reach_every_parameter(flags):
    lmu = make(flags)
    names = {n for n, _ in lmu.named_parameters()}
    if flags:
        assert {"theta", "e_h.weight", "e_m.weight"} <= names
    h, state = lmu(torch.randn(2, 25, 6))
    (h.pow(2).sum() + state.m.pow(2).sum()).backward()
    for name, p in lmu.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_theta_gradient_matches_finite_differences():
    A, B = legendre_delay(5, 1.0)
    theta = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda th: zoh(A / th, B / th), (theta,))


def test_cached_discretisation_follows_trainable_theta():
    lmu = make(ALL_FLAGS)
    x = torch.randn(2, 10, 6)
    with torch.no_grad():
        before = lmu(x)[0]
        lmu.theta.mul_(2.0)  # what an optimizer step does: an in-place update
        after = lmu(x)[0]
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, lmu(x)[0].detach())  # grad mode: no cache


def test_fft_path_under_bf16_autocast_is_close_to_fp32():
    lmu = make({})
    x = torch.randn(2, 200, 6)
    h32, s32 = lmu(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16, s16 = lmu(x)
        h16.float().sum().backward()
    assert s16.m.dtype == torch.float32  # the memory itself is never rounded to bf16
    assert (h16.float() - h32).abs().max() < 0.05
    assert lmu.W_u.weight.grad is not None
    with torch.no_grad():  # a bf16 model without autocast (torch.fft has no bf16 kernels)
        h_bf, s_bf = lmu.bfloat16()(x.bfloat16())
    assert h_bf.dtype == torch.bfloat16 and s_bf.m.dtype == torch.float32
    assert (h_bf.float() - h32).abs().max() < 0.05


def test_path_selection():
    assert make({}).use_fft
    assert not make({}, parallel=False).use_fft
    for flag in ALL_FLAGS:
        assert not make({flag: True}).use_fft


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(order=0), "order"),
        (dict(order=2.5), "order"),
        (dict(theta=0.0), "theta"),
        (dict(theta=-3.0), "theta"),
        (dict(theta=float("nan")), "theta"),
        (dict(memory_d=0), "memory_d"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(hidden_to_memory=True, parallel=True), "hidden_to_memory"),
        (dict(memory_to_memory=True, parallel=True), "memory_to_memory"),
        (dict(trainable_theta=True, parallel=True), "trainable_theta"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    args = dict(input_size=4, hidden_size=8, memory_d=1, order=4, theta=10.0) | kwargs
    with pytest.raises(ValueError, match=match):
        LMU(**args)


def test_invalid_discretisation_arguments_raise():
    with pytest.raises(ValueError, match="order"):
        legendre_delay(0, 1.0)
    with pytest.raises(ValueError, match="theta"):
        legendre_delay(4, float("inf"))
    with pytest.raises(ValueError, match="dt"):
        zoh(*legendre_delay(4, 1.0), dt=0.0)
