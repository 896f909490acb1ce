"""DPM-Solver++ (multistep, data prediction) on the EDM PF-ODE, checked against closed forms.

Ground truth: for Gaussian data x0 ~ N(mu, s^2) (per dimension) the ideal denoiser is
D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) and the PF-ODE dx/dsigma = (x - D) / sigma has the
exact solution x(sigma) = mu + (x(sigma_T) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2).
"""

import math

import pytest
import torch

from stages.method import solvers

MU = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
S = torch.tensor([0.7, 0.3, 1.2], dtype=torch.float64).view(1, 3, 1, 1)
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002


def gaussian_denoiser(x, sigma):
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_state(x_T, sigma, sigma_T=SIGMA_MAX):
    return MU + (x_T - MU) * torch.sqrt((S**2 + sigma**2) / (S**2 + sigma_T**2))


@pytest.fixture(scope="module")
def x_T():
    g = torch.Generator().manual_seed(1234)
    eps = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    return MU + torch.sqrt(S**2 + SIGMA_MAX**2) * eps


def test_error_at_sigma_min_falls_at_least_fourfold_per_nfe_doubling(x_T):
    errors = []
    for nfe in (16, 32, 64, 128):
        traj = solvers.dpm_solver_pp(gaussian_denoiser, x_T, solvers.logsnr_grid(nfe))
        assert traj.shape == (x_T.shape[0], nfe + 1, *x_T.shape[1:])
        assert traj.dtype == torch.float64
        errors.append((traj[:, -1] - exact_state(x_T, SIGMA_MIN)).abs().max().item())
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert coarse / fine >= 4.0, errors
    # and the absolute level is what a 3rd-order multistep gets at 16 NFE on this problem
    assert errors[0] < 0.1, errors


def test_every_intermediate_state_tracks_the_exact_solution(x_T):
    nfe = 128
    sigmas = solvers.logsnr_grid(nfe)
    traj = solvers.dpm_solver_pp(gaussian_denoiser, x_T, sigmas)
    assert torch.equal(traj[:, 0], x_T)
    for k, sigma in enumerate(sigmas.tolist()):
        exact = exact_state(x_T, sigma)
        err = (traj[:, k] - exact).abs().max().item()
        assert err < 2e-3, (k, sigma, err)


def test_first_order_is_far_worse_than_third_order(x_T):
    """Guards against a solver that silently runs at order 1 (the error bound above would fail)."""
    sigmas = solvers.logsnr_grid(32)
    exact = exact_state(x_T, SIGMA_MIN)
    e1 = (solvers.dpm_solver_pp(gaussian_denoiser, x_T, sigmas, order=1)[:, -1] - exact).abs().max()
    e3 = (solvers.dpm_solver_pp(gaussian_denoiser, x_T, sigmas, order=3)[:, -1] - exact).abs().max()
    assert e3 < e1 / 10


PAPER_GRID_16 = ["80", "41.254", "21.273", "10.970", "5.657", "2.917", "1.504", "0.77569", "0.4",
                 "0.2063", "0.1064", "0.05485", "0.02828", "0.01459", "0.00752", "0.003878", "0.002"]


def test_logsnr_grid_16_matches_paper_numbers():
    grid = solvers.logsnr_grid(16)
    assert grid.dtype == torch.float64
    assert grid.shape == (17,)
    for k, (value, printed) in enumerate(zip(grid.tolist(), PAPER_GRID_16, strict=True)):
        decimals = len(printed.split(".")[1]) if "." in printed else 0
        assert abs(value - float(printed)) <= 0.5 * 10**-decimals + 1e-12, (k, value, printed)
    assert grid[0].item() == pytest.approx(80.0, abs=1e-12)
    assert grid[-1].item() == pytest.approx(0.002, rel=1e-12)
    # the CIFAR 2-step mid_t is grid point 7
    assert round(grid[7].item(), 5) == 0.77569


def test_logsnr_grid_is_uniform_in_log_sigma():
    for nfe in (4, 16, 33):
        grid = solvers.logsnr_grid(nfe)
        steps = grid.log().diff()
        expected = math.log(SIGMA_MIN / SIGMA_MAX) / nfe
        torch.testing.assert_close(steps, torch.full_like(steps, expected), rtol=0, atol=1e-12)


def test_step_orders():
    assert solvers.step_orders(16) == [1, 2] + [3] * 12 + [2, 1]
    assert len(solvers.step_orders(16)) == 16
    assert solvers.step_orders(16, lower_order_final=False) == [1, 2] + [3] * 14
    assert solvers.step_orders(16, lower_order_final=False)[-1] == 3
    assert solvers.step_orders(3) == [1, 2, 1]
    assert solvers.step_orders(2) == [1, 1]
    assert solvers.step_orders(5, order=2) == [1, 2, 2, 2, 1]


def _nonlinear_denoiser(x, sigma):
    return torch.tanh(x) * (1 + sigma) + 0.1 * sigma


@pytest.mark.parametrize("order", [1, 3])
def test_first_order_step_is_ddim(order):
    """On a 2-step grid both steps are order 1 (warm-up, then lower_order_final)."""
    sigmas = [2.0, 0.5, 0.1]
    x0 = torch.tensor([[0.7, -1.3], [2.0, 0.05]], dtype=torch.float64)
    traj = solvers.dpm_solver_pp(_nonlinear_denoiser, x0, sigmas, order=order)
    x1 = (0.5 / 2.0) * x0 + (1 - 0.5 / 2.0) * _nonlinear_denoiser(x0, 2.0)
    x2 = (0.1 / 0.5) * x1 + (1 - 0.1 / 0.5) * _nonlinear_denoiser(x1, 0.5)
    assert traj.shape == (2, 3, 2)
    torch.testing.assert_close(traj[:, 0], x0, rtol=0, atol=0)
    torch.testing.assert_close(traj[:, 1], x1, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(traj[:, 2], x2, rtol=1e-14, atol=1e-14)


def test_second_order_step_matches_hand_formula():
    """Step 2 of a 3-step grid is the DPM-Solver++(2M) 'dpmsolver' update (docs/method.md#trajectories)."""
    sigmas = [3.0, 1.0, 0.4, 0.1]
    lam = [-math.log(s) for s in sigmas]
    x0 = torch.tensor([0.4, -0.9, 1.7], dtype=torch.float64)
    traj = solvers.dpm_solver_pp(_nonlinear_denoiser, x0, sigmas)  # orders 1, 2, 1
    d0 = _nonlinear_denoiser(x0, sigmas[0])
    x1 = (sigmas[1] / sigmas[0]) * x0 + (1 - sigmas[1] / sigmas[0]) * d0
    d1 = _nonlinear_denoiser(x1, sigmas[1])
    h = lam[2] - lam[1]
    r0 = (lam[1] - lam[0]) / h
    phi1 = math.expm1(-h)
    x2 = (sigmas[2] / sigmas[1]) * x1 - phi1 * d1 - 0.5 * phi1 * (d1 - d0) / r0
    torch.testing.assert_close(traj[:, 1], x1, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(traj[:, 2], x2, rtol=1e-14, atol=1e-14)


def test_third_order_step_matches_official_dpm_solver_pp_3m():
    """Step 3 of a 4-point grid without lower_order_final is the DPM-Solver++(3M) update of the
    official code (dpm_solver_pytorch.multistep_dpm_solver_third_update, 'dpmsolver++'):
    x' = (s'/s) x - phi1 D0 + phi2 D1 - phi3 D2, phi2 = phi1/h + 1, phi3 = phi2/h - 1/2."""
    sigmas = [5.0, 2.0, 0.7, 0.2]
    lam = [-math.log(s) for s in sigmas]
    x0 = torch.tensor([[0.4, -0.9, 1.7]], dtype=torch.float64)
    traj = solvers.dpm_solver_pp(_nonlinear_denoiser, x0, sigmas, order=3, lower_order_final=False)
    m0 = _nonlinear_denoiser(x0, sigmas[0])
    x1 = (sigmas[1] / sigmas[0]) * x0 - math.expm1(lam[0] - lam[1]) * m0
    m1 = _nonlinear_denoiser(x1, sigmas[1])
    h = lam[2] - lam[1]
    phi1 = math.expm1(-h)
    x2 = (sigmas[2] / sigmas[1]) * x1 - phi1 * m1 - 0.5 * phi1 * (m1 - m0) / ((lam[1] - lam[0]) / h)
    m2 = _nonlinear_denoiser(x2, sigmas[2])
    h = lam[3] - lam[2]
    r0, r1 = (lam[2] - lam[1]) / h, (lam[1] - lam[0]) / h
    d1_0, d1_1 = (m2 - m1) / r0, (m1 - m0) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    x3 = (sigmas[3] / sigmas[2]) * x2 - phi1 * m2 + phi2 * d1 - phi3 * d2
    for k, want in enumerate([x0, x1, x2, x3]):
        torch.testing.assert_close(traj[:, k], want, rtol=1e-13, atol=1e-13)


def test_third_order_exact_for_denoiser_linear_in_lambda():
    """With D depending on lambda only, the flow is x(l') = (s'/s) x(l) + s' int e^u D(u) du.

    For D affine in lambda, the order-2 and order-3 corrections see D1 = h D' exactly and D2 = 0, so
    the order-3 step (the 3rd step of a 3-step grid without lower_order_final) is exact.
    """
    a, b = 0.3, -0.2

    def d(x, sigma):
        return torch.full_like(x, a + b * (-math.log(sigma)))

    def antiderivative(lam):  # of e^u (a + b u)
        return math.exp(lam) * (a + b * (lam - 1))

    lam = [0.0, 0.3, 0.55, 0.9]
    sigmas = [math.exp(-v) for v in lam]
    x = torch.tensor([0.25], dtype=torch.float64)
    traj = solvers.dpm_solver_pp(d, x, sigmas, order=3, lower_order_final=False)
    k = 2
    exact = (sigmas[k + 1] / sigmas[k]) * traj[0, k].item() + sigmas[k + 1] * (
        antiderivative(lam[k + 1]) - antiderivative(lam[k]))
    # the 3rd step is exact up to rounding, while the (order-1) first step is not
    assert traj[0, 3].item() == pytest.approx(exact, abs=1e-14)
    exact_first = (sigmas[1] / sigmas[0]) * 0.25 + sigmas[1] * (antiderivative(lam[1]) - antiderivative(lam[0]))
    assert abs(traj[0, 1].item() - exact_first) > 1e-4


def test_denoiser_called_exactly_nfe_times_never_at_final_sigma(x_T):
    for nfe in (1, 2, 5, 16):
        sigmas = solvers.logsnr_grid(nfe)
        calls = []

        def counting(x, sigma, calls=calls):
            calls.append(sigma)
            return gaussian_denoiser(x, sigma)

        solvers.dpm_solver_pp(counting, x_T, sigmas)
        assert len(calls) == nfe
        assert calls == sigmas[:-1].tolist()
        assert all(isinstance(s, float) for s in calls)
        assert sigmas[-1].item() not in calls


def test_nan_denoiser_raises():
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(FloatingPointError):
        solvers.dpm_solver_pp(lambda x, s: torch.full_like(x, float("nan")), x, solvers.logsnr_grid(4))


def test_non_finite_denoiser_mid_trajectory_raises_naming_the_step():
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    sigmas = solvers.logsnr_grid(8)
    bad_sigma = sigmas[3].item()

    def denoise(x, s):
        out = 0.5 * x
        if s == bad_sigma:
            out[1, 0, 1, 1] = float("inf")
        return out

    with pytest.raises(FloatingPointError, match="step 3"):
        solvers.dpm_solver_pp(denoise, x, sigmas)
