"""Teacher trajectory solvers, two kinds by the time they run in:

- in sigma, on the EDM probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (`SOLVERS`):
  DPM-Solver++ for the EDM teachers;
- in flow time, t = 1 noise to t = 0 data on z_t = (1 - t) x + t eps (`FLOW_SOLVERS`): MeanFlow's
  multi-step sampler for an average-velocity teacher u(z, r, t) (`meanflow_sampler`).

`dpm_solver_pp` is DPM-Solver++ (Lu et al. 2022), multistep, data prediction, the 'dpmsolver'
variant, written from its equations for the EDM schedule (alpha = 1, sigma_t = t, so the half
log-SNR is lambda = -log sigma):

    order 1 (DDIM):  x' = (s'/s) x - phi1 D0,                            phi1 = expm1(-h)
    order 2:         x' = (s'/s) x - phi1 D0 - phi1 D1 / 2,             D1 = (D0 - D_-1) / r0
    order 3:         x' = (s'/s) x - phi1 D0 + phi2 D1 - phi3 D2,        phi2 = phi1/h + 1,
                                                                         phi3 = phi2/h - 1/2
with h = lambda' - lambda, r_k = h_k / h over the previous intervals, and for order 3
    D1_0 = (D0 - D_-1) / r0,  D1_1 = (D_-1 - D_-2) / r1,
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1) / (r0 + r1).
Orders warm up 1, 2, 3 and, with lower_order_final, fall back to 2 and 1 on the last two steps
(docs/method.md#trajectories). N steps cost exactly N denoiser calls: none at the final sigma.
"""

import math

import torch

from stages.method import flowmap


def logsnr_grid(nfe, sigma_max=80.0, sigma_min=0.002, dtype=torch.float64):
    """sigma_k = sigma_max (sigma_min / sigma_max)^(k / nfe), k = 0..nfe: uniform in log-SNR."""
    k = torch.arange(nfe + 1, dtype=torch.float64)
    grid = sigma_max * (sigma_min / sigma_max) ** (k / nfe)
    return grid.to(dtype)


def step_orders(steps, order=3, lower_order_final=True):
    orders = []
    for i in range(1, steps + 1):
        o = min(order, i)
        if lower_order_final:
            o = min(o, steps + 1 - i)
        orders.append(o)
    return orders


def dpm_solver_pp(denoise, x, sigmas, order=3, lower_order_final=True):
    """Integrate from sigmas[0] to sigmas[-1]; returns all len(sigmas) states, stacked on dim 1.

    `denoise(x, sigma)` returns D(x; sigma) for a scalar float sigma. Non-finite teacher outputs
    raise instead of being zeroed, so a broken teacher cannot write poisoned trajectories.
    """
    sigmas = [float(s) for s in sigmas]
    steps = len(sigmas) - 1
    orders = step_orders(steps, order, lower_order_final)
    lambdas = [-math.log(s) for s in sigmas]
    states = [x]
    history = []  # (lambda, D) of the most recent evaluations, newest last
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d0 = denoise(x, s)
        if not torch.isfinite(d0).all():
            raise FloatingPointError(f"teacher output is not finite at sigma={s:g} (step {i})")
        history.append((lambdas[i], d0))
        history = history[-3:]
        h = lambdas[i + 1] - lambdas[i]
        phi1 = math.expm1(-h)
        o = min(orders[i], len(history))
        x_next = (s_next / s) * x - phi1 * d0
        if o >= 2:
            lam_1, d_1 = history[-2]
            r0 = (lambdas[i] - lam_1) / h
            d1_0 = (d0 - d_1) / r0
            if o == 2:
                x_next = x_next - 0.5 * phi1 * d1_0
            else:
                lam_2, d_2 = history[-3]
                r1 = (lam_1 - lam_2) / h
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                x_next = x_next + phi2 * d1 - phi3 * d2
        x = x_next
        states.append(x)
    return torch.stack(states, dim=1)


SOLVERS = {"dpm_solver_pp": dpm_solver_pp}


# ----------------------------------------------------------------------------------------------
# Flow time


def flow_time_grid(steps, dtype=torch.float64):
    """t_k = 1 - k / steps, k = 0..steps: the uniform grid of MeanFlow's multi-step sampler."""
    if steps < 1:
        raise ValueError(f"flow_time_grid: steps must be >= 1, got {steps}")
    return (1 - torch.arange(steps + 1, dtype=torch.float64) / steps).to(dtype)


def meanflow_sampler(u, z, times, labels=None):
    """MeanFlow's multi-step sampler (Geng et al. 2025): z_r = z_t - (t - r) u(z_t, r, t) from
    times[0] to times[-1]. Each step is exact for the exact average velocity, so the states are the
    flow map's values at the grid's times, whatever their spacing.

    `u(z, r, t[, labels])` takes r, t as [B] tensors in z's dtype; `labels` [B] (class-conditional
    teachers) go to every call. Returns (states [B, K+1, ...] with z itself first, times float64
    [K+1]); N steps cost N calls. Non-finite outputs raise, as in `dpm_solver_pp`.
    """
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    if len(times) < 2 or not bool((times[:-1] > times[1:]).all()):
        raise ValueError(f"meanflow_sampler: times must decrease strictly (noise first), got {times.tolist()}")
    if times[0] > 1 or times[-1] < 0:
        raise ValueError(f"meanflow_sampler: times must lie in [0, 1], got {times.tolist()}")
    batch = z.shape[0]
    states = [z]
    for i, (t, r) in enumerate(zip(times[:-1].tolist(), times[1:].tolist(), strict=False)):
        t_b = torch.full((batch,), t, dtype=z.dtype, device=z.device)
        r_b = torch.full((batch,), r, dtype=z.dtype, device=z.device)
        velocity = flowmap.call_u(u, z, r_b, t_b, labels)
        if not torch.isfinite(velocity).all():
            raise FloatingPointError(f"teacher output is not finite at t={t:g} (step {i})")
        z = z - (t - r) * velocity
        states.append(z)
    return torch.stack(states, dim=1), times


FLOW_SOLVERS = {"meanflow": meanflow_sampler}
