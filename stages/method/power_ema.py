"""Power-function EMA and its post-hoc reconstruction (EDM2: Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", Section 3 and Appendix C), in training steps.

A power-function EMA of exponent gamma > 0, read at training time t, averages the weights theta(tau)
of every earlier time with the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t,

whose width relative to its age is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).

Tracked after every step t = 1, 2, ... as ema <- beta_t ema + (1 - beta_t) theta_t with
beta_t = (1 - 1/t)^(gamma + 1), it weighs theta_i (the weights after step i) with

    w_i = (i^(gamma + 1) - (i - 1)^(gamma + 1)) / t^(gamma + 1),

(the products of the betas telescope), which is p_{t,gamma} integrated over (i - 1, i]: the tracked
EMA is the profile applied to weights that stay theta_i through step i. So the inner products of
profiles are exact for the tracked averages too, and in closed form (m = min(t_a, t_b)):

    <p_{t_a,g_a}, p_{t_b,g_b}> = (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)).

Post-hoc, snapshots of a few profiles at a few times are combined, sum_j x_j ema_j, into the EMA of
any other profile p_r: x minimises || sum_j x_j p_j - p_r ||^2 over tau, that is, solves the normal
equations sum_j <p_i, p_j> x_j = <p_i, p_r>, and is then divided by its sum. Every profile holds a
total weight of 1, but the least-squares x need not sum to 1 where few snapshots fit the target badly
(4 snapshots of 0.05 and 0.10 give 0.91 for 0.2), and a sum off 1 would scale every weight of the
network; NVlabs/edm2's implementation, run on the same snapshots, gives these rescaled coefficients.
Every formula is invariant to the unit of time: steps here, images in the paper.
"""

import math

import numpy as np

# gamma = 0, the plain average of all training so far: the widest profile of gamma >= 0
MAX_SIGMA_REL = 1 / (2 * math.sqrt(3))


def sigma_rel_of(gamma):
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel):
    """The exponent of relative width `sigma_rel` in (0, MAX_SIGMA_REL): the root gamma > 0 of
    sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, where sigma_rel(gamma) decreases."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel {sigma_rel} must lie in (0, {MAX_SIGMA_REL:.4f}); wider profiles than the "
                         "plain average of all of training (gamma = 0) are not power functions of gamma > 0")
    inv = 1 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    gamma = max(r.real for r in roots if abs(r.imag) < 1e-9)
    # one Newton step on the cubic polishes the eigenvalue solver's last bits
    f = ((gamma + 7) * gamma + 16 - inv) * gamma + 12 - inv
    df = (3 * gamma + 14) * gamma + 16 - inv
    return float(gamma - f / df)


def beta(step, gamma):
    """The decay of the update after step `step` (1, 2, ...): (1 - 1/step)^(gamma + 1), 0 at step 1."""
    return (1 - 1 / step) ** (gamma + 1)


def weights(step, gamma):
    """[w_1 .. w_step]: what the tracked EMA at `step` holds of the weights after each step (float64)."""
    i = np.arange(1, step + 1, dtype=np.float64)
    return (i / step) ** (gamma + 1) - ((i - 1) / step) ** (gamma + 1)


def inner_product(t_a, gamma_a, t_b, gamma_b):
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> over tau (module docstring)."""
    m = min(t_a, t_b)
    g = gamma_a + gamma_b + 1
    # in logarithms: the powers of steps near a million overflow a float
    log = (math.log(gamma_a + 1) + math.log(gamma_b + 1) + g * math.log(m) - math.log(g)
           - (gamma_a + 1) * math.log(t_a) - (gamma_b + 1) * math.log(t_b))
    return math.exp(log)


def coefficients(snapshots, target):
    """The weights x of the `snapshots` ((step, gamma) each) whose combination comes nearest the profile
    `target` (step, gamma), least squares rescaled to sum to 1 (module docstring); the relative error of
    that fit, || sum x_j p_j - p_r || / || p_r ||; and the least-squares weights' own sum."""
    A = np.array([[inner_product(*a, *b) for b in snapshots] for a in snapshots])
    b = np.array([inner_product(*a, *target) for a in snapshots])
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    mass = float(x.sum())
    x = x / mass
    rr = inner_product(*target, *target)
    residual = max(x @ A @ x - 2 * x @ b + rr, 0.0)
    return x, math.sqrt(residual / rr), mass


def profile_sigma_rel(w0, w, step):
    """The relative width of an average holding `w0` of the initial weights (at tau = 0) and w[i - 1]
    of the weights after step i (on (i - 1, i], as the power profiles count them), read at `step`:
    how a per-step EMA compares with the power profiles."""
    w = np.asarray(w, dtype=np.float64)
    mid = np.arange(1, len(w) + 1) - 0.5
    total = w0 + w.sum()
    mean = (w * mid).sum() / total
    second = (w * (mid**2 + 1 / 12)).sum() / total  # a uniform piece of width 1 adds 1/12 of variance
    return math.sqrt(max(second - mean**2, 0.0)) / step
