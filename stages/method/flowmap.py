"""The flow-matching side of the pipeline: the one place that converts between EDM's sigma
parameterisation and the linear interpolant of flow matching, and the 1- and 2-step samplers of
MeanFlow's average-velocity model u(z, r, t) (docs/method.md#meanflow).

EDM (VE):        x_sigma = x + sigma eps,               sigma in [0, inf)
flow matching:   z_t = (1 - t) x + t eps, t = 1 noise,  t in [0, 1]
Dividing x_sigma by (1 + sigma) gives z_t exactly:

    z_t = x_sigma / (1 + sigma),   t = sigma / (1 + sigma),   sigma = t / (1 - t).

Velocities: along the EDM PF-ODE dx/dsigma = (x - D(x; sigma)) / sigma, the state z moves with
dz/dt = (x - (1 + sigma) D) / sigma = (z - D) / t, which is eps - x on the exact path (v of MeanFlow).

Where the EDM teacher starts (sigma_max = 80, so t = 80/81), the flow-matching sampler starts at
t = 1. `trajectory_to_flow` closes the gap by putting the prior noise itself, z_1 = x_T / sigma_max,
in front of the converted states: this is the same approximation EDM makes by drawing
x_T = sigma_max eps without the data (it moves z by mean(x) / (1 + sigma_max), 1/81 of the data
mean, on the segment t in [80/81, 1]).
"""

import torch

# ----------------------------------------------------------------------------------------------
# Conversions (all elementwise; sigma and t broadcast against the state's leading dimension)


def sigma_to_t(sigma):
    return sigma / (1 + sigma)


def t_to_sigma(t):
    if torch.as_tensor(t).max() >= 1:
        raise ValueError("t_to_sigma: t = 1 is sigma = inf; only t < 1 has an EDM state")
    return t / (1 - t)


def _per_sample(scale, state):
    scale = torch.as_tensor(scale, dtype=state.dtype, device=state.device)
    return scale.reshape(-1, *([1] * (state.ndim - 1))) if scale.ndim else scale


def edm_to_flow_state(x, sigma):
    """z_t = x_sigma / (1 + sigma)."""
    return x / (1 + _per_sample(sigma, x))


def flow_to_edm_state(z, t):
    """x_sigma = z_t / (1 - t) = (1 + sigma) z_t."""
    return z / (1 - _per_sample(t, z))


def edm_velocity(x, denoised, sigma):
    """dz/dt of the flow-matching state, from the EDM state and the denoiser output D(x; sigma)."""
    s = _per_sample(sigma, x)
    return (x - (1 + s) * denoised) / s


def trajectory_to_flow(states, sigmas, sigma_max):
    """EDM trajectory states [..., K+1, C, H, W] at `sigmas` [K+1] (decreasing from sigma_max)
    -> (z [..., K+2, C, H, W], t [K+2]): the prior noise at t = 1, then every state converted."""
    if abs(float(sigmas[0]) - sigma_max) > 1e-6 * sigma_max:
        raise ValueError(f"trajectory starts at sigma {float(sigmas[0])}, not sigma_max {sigma_max}")
    sig = torch.as_tensor(sigmas, dtype=states.dtype, device=states.device)
    k_dim = states.ndim - 4
    shape = [1] * states.ndim
    shape[k_dim] = -1
    z = states / (1 + sig.reshape(shape))
    prior = states.narrow(k_dim, 0, 1) / sigma_max
    t = torch.cat([torch.ones(1, dtype=sig.dtype, device=sig.device), sigma_to_t(sig)])
    return torch.cat([prior, z], dim=k_dim), t


# ----------------------------------------------------------------------------------------------
# Sampling an average-velocity model u(z, r, t) (stages/networks/average_velocity.py)


def call_u(u, z, r, t, labels=None):
    """u(z, r, t), or u(z, r, t, labels): unconditional models keep their three-argument call."""
    return u(z, r, t) if labels is None else u(z, r, t, labels)


def one_step(u, z, labels=None):
    """x = z_1 - u(z_1, 0, 1)."""
    return z - call_u(u, z, 0.0, 1.0, labels)


def two_step(u, z, t_mid, labels=None):
    """z_mid = z_1 - (1 - t_mid) u(z_1, t_mid, 1), then x = z_mid - t_mid u(z_mid, 0, t_mid)."""
    z_mid = z - (1 - t_mid) * call_u(u, z, t_mid, 1.0, labels)
    return z_mid - t_mid * call_u(u, z_mid, 0.0, t_mid, labels)
