"""MeanFlow's multi-step sampler as a trajectory solver, against the exact flow of a Gaussian.

Ground truth: data x | y ~ N(mu_y, s^2 I), linear path z_t = (1 - t) x + t eps. The probability-flow
map from time t to time r is affine,

    z_r = (1 - r) mu + sqrt(((1 - r)^2 s^2 + r^2) / ((1 - t)^2 s^2 + t^2)) (z_t - (1 - t) mu),

so the exact average velocity is u(z_t, r, t) = (z_t - z_r) / (t - r), and from z_1 = eps the state
at time t is (1 - t) mu + sqrt((1 - t)^2 s^2 + t^2) eps.
"""

import pytest
import torch

from stages.method import solvers

MU = torch.tensor([[0.3, -0.2, 0.5], [-1.0, 0.8, 0.1]], dtype=torch.float64)  # per class, per channel
S = torch.tensor([0.7, 0.3, 1.2], dtype=torch.float64).view(1, 3, 1, 1)


def spread(t):
    return ((1 - t) ** 2 * S**2 + t**2).sqrt()


def exact_flow(z, r, t, labels):
    """z_r from z_t; r, t [B] tensors."""
    mu = MU[labels].view(-1, 3, 1, 1)
    rr, tt = r.view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)
    return (1 - rr) * mu + spread(rr) / spread(tt) * (z - (1 - tt) * mu)


def exact_u(z, r, t, labels):
    return (z - exact_flow(z, r, t, labels)) / (t - r).view(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def start():
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    return eps, labels


def exact_states(eps, labels, times):
    mu = MU[labels].view(-1, 1, 3, 1, 1)
    tt = times.view(1, -1, 1, 1, 1)
    return (1 - tt) * mu + ((1 - tt) ** 2 * S.unsqueeze(1) ** 2 + tt**2).sqrt() * eps.unsqueeze(1)


def test_flow_time_grid():
    grid = solvers.flow_time_grid(8)
    assert grid.dtype == torch.float64 and grid.tolist() == [1 - k / 8 for k in range(9)]
    with pytest.raises(ValueError, match="steps"):
        solvers.flow_time_grid(0)


@pytest.mark.parametrize("times", [solvers.flow_time_grid(8), solvers.flow_time_grid(1),
                                   torch.tensor([1.0, 0.93, 0.6, 0.55, 0.2, 0.01, 0.0], dtype=torch.float64)])
def test_exact_average_velocity_reproduces_the_exact_flow_at_every_grid_point(start, times):
    eps, labels = start
    states, got_times = solvers.meanflow_sampler(exact_u, eps, times, labels)
    assert states.shape == (6, len(times), 3, 2, 2) and states.dtype == torch.float64
    assert torch.equal(got_times, times) and torch.equal(states[:, 0], eps)
    torch.testing.assert_close(states, exact_states(eps, labels, times), rtol=1e-12, atol=1e-12)
    # and the end is a draw of the data distribution's affine image of eps: mu_y + s eps
    torch.testing.assert_close(states[:, -1], MU[labels].view(-1, 3, 1, 1) + S * eps, rtol=1e-12, atol=1e-12)


def test_a_wrong_average_velocity_fails_the_comparison(start):
    eps, labels = start
    times = solvers.flow_time_grid(8)
    want = exact_states(eps, labels, times)

    def instantaneous(z, r, t, labels):  # u(z, r, t) = v(z, t): the Euler sampler of the flow
        h = 1e-7
        return exact_u(z, t - h, t, labels)

    def wrong_class(z, r, t, labels):
        return exact_u(z, r, t, 1 - labels)

    def wrong_interval(z, r, t, labels):  # the average over a longer interval than [r, t]
        return exact_u(z, r, torch.clamp(t + 0.5 * (t - r), max=1.0), labels)

    for wrong in (instantaneous, wrong_class, wrong_interval):
        states, _ = solvers.meanflow_sampler(wrong, eps, times, labels)
        err = (states[:, 1:] - want[:, 1:]).abs().max().item()
        assert err > 1e-3, (wrong.__name__, err)


def test_labels_reach_every_call_and_unconditional_u_keeps_three_arguments(start):
    eps, labels = start
    seen = []

    def conditional(z, r, t, labels):
        seen.append((labels.clone(), float(t[0]), float(r[0])))
        return torch.zeros_like(z)

    solvers.meanflow_sampler(conditional, eps, solvers.flow_time_grid(4), labels)
    assert [(s, r) for _, s, r in seen] == [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]
    assert all(torch.equal(y, labels) for y, _, _ in seen)
    states, _ = solvers.meanflow_sampler(lambda z, r, t: -z, eps, solvers.flow_time_grid(2))
    torch.testing.assert_close(states[:, -1], eps * 1.5 * 1.5, rtol=1e-15, atol=0)


def test_bad_grids_and_non_finite_teachers_raise(start):
    eps, labels = start
    with pytest.raises(ValueError, match="decrease"):
        solvers.meanflow_sampler(exact_u, eps, torch.tensor([0.0, 1.0]), labels)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        solvers.meanflow_sampler(exact_u, eps, torch.tensor([1.5, 0.0]), labels)
    with pytest.raises(FloatingPointError, match="not finite"):
        solvers.meanflow_sampler(lambda z, r, t, y: z / 0 * 0, eps, solvers.flow_time_grid(2), labels)
    assert solvers.FLOW_SOLVERS["meanflow"] is solvers.meanflow_sampler
