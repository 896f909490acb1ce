"""Objectives of the average-velocity model u(z, r, t): CMT-MF mid-training (docs/method.md#meanflow)
and MeanFlow post-training (docs/method.md#meanflow). Flow-matching time: z_t = (1 - t) x + t eps, t = 1 noise.

Each loss returns per-sample values [B]; the training loop takes the mean.
"""

import torch

from stages.method import losses

# ----------------------------------------------------------------------------------------------
# CMT-MF: for states i > j of a teacher trajectory (t_i > t_j), regress u(z_i, t_j, t_i) onto the
# average velocity (z_i - z_j) / (t_i - t_j) between them. No JVP, no stop-gradient.


def all_pairs(num_points):
    """(a, b) index pairs with a < b, i.e. t[a] > t[b] on a trajectory stored noise first."""
    a, b = torch.triu_indices(num_points, num_points, offset=1)
    return a, b


def cmt_mf_pairs(z, t, pairs_per_trajectory, generator):
    """z [T, K, C, H, W] (noise first), t [K] (decreasing) -> (inputs, r, t_in, targets), with
    `pairs_per_trajectory` pairs drawn uniformly (with replacement) from the K(K-1)/2 per trajectory."""
    T, K = z.shape[:2]
    if not bool((t[:-1] > t[1:]).all()):
        raise ValueError("cmt_mf_pairs: trajectory times must decrease strictly (noise first)")
    a, b = all_pairs(K)
    pick = torch.randint(len(a), (T, pairs_per_trajectory), generator=generator)
    ia, ib = a[pick].to(z.device), b[pick].to(z.device)  # [T, P]
    rows = torch.arange(T, device=z.device)[:, None].expand_as(ia)
    z_i, z_j = z[rows, ia], z[rows, ib]  # [T, P, C, H, W]
    t_i, t_j = t[ia], t[ib]
    target = (z_i - z_j) / (t_i - t_j).reshape(*t_i.shape, 1, 1, 1)
    flat = lambda v: v.reshape(T * pairs_per_trajectory, *v.shape[2:])  # noqa: E731
    return flat(z_i), flat(t_j), flat(t_i), flat(target)


def cmt_mf_loss(u, z, t, pairs_per_trajectory, generator, distance=losses.squared_l2_distance):
    inputs, r, t_in, target = cmt_mf_pairs(z, t, pairs_per_trajectory, generator)
    return distance(u(inputs, r, t_in), target)


# ----------------------------------------------------------------------------------------------
# MeanFlow (Geng et al. 2025): u_tgt = v - (t - r) du/dt, du/dt = v d_z u + d_t u from one JVP
# along the tangent (v, 0, 1); adaptive weight w = 1 / (||u - sg(u_tgt)||^2 + c)^p, detached.


def logit_normal(n, generator, mean, std):
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64))


def sample_r_t(n, generator, *, P_mean=-0.4, P_std=1.0, ratio_r_neq_t=0.25):
    """Two logit-normal draws sorted so t >= r; r is then set to t except on a `ratio_r_neq_t`
    fraction of the samples (chosen at random). Returned as float64 [n] each."""
    a, b = logit_normal(n, generator, P_mean, P_std), logit_normal(n, generator, P_mean, P_std)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    keep = torch.rand(n, generator=generator, dtype=torch.float64) < ratio_r_neq_t
    return torch.where(keep, r, t), t


def linear_path(x, eps, t):
    """z_t = (1 - t) x + t eps and its velocity v = eps - x."""
    tt = t.reshape(-1, *([1] * (x.ndim - 1)))
    return (1 - tt) * x + tt * eps, eps - x


def adaptive_weighted(delta, p=1.0, c=1e-3):
    """w ||delta||^2 with w = 1 / (||delta||^2 + c)^p detached: ~||delta||^(2 - 2p) in scale."""
    sq = delta.flatten(1).square().sum(1)
    return sq / (sq.detach() + c) ** p


def mean_velocity_derivative(u, z, r, t, v):
    """(u(z, r, t), du/dt) with du/dt = v d_z u + 0 d_r u + 1 d_t u, by one forward-mode JVP."""
    return torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))


def meanflow_loss_at(u, z, r, t, v, *, p=1.0, c=1e-3, jvp_u=None):
    """The MeanFlow loss at given (z, r, t, v).

    With `jvp_u` (the pipeline's route): torch.func.jvp cannot pass through a DistributedDataParallel
    wrapper, so the JVP runs without a graph on `jvp_u` (the bare module), then `u` (the wrapper, or
    the module itself) runs a plain forward with the same dropout mask (the RNG state is restored
    between the two), and DDP all-reduces the gradient of that forward as usual. Its memory is that
    of a flow-matching step. Without `jvp_u`: one JVP with a graph on `u`, the gradient through its
    primal output; the same gradient, but it keeps the tangent's activations (3x the memory of a
    flow-matching step, bench/RESULTS.md). The target is stop-gradient either way.
    """
    if jvp_u is None:
        out, dudt = mean_velocity_derivative(u, z, r, t, v)
    else:
        devices = [z.device] if z.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with torch.no_grad():
                _, dudt = mean_velocity_derivative(jvp_u, z, r, t, v)
        out = u(z, r, t)
    target = (v - (t - r).reshape(-1, 1, 1, 1) * dudt).detach()
    return adaptive_weighted(out - target, p, c)


def flow_matching_loss_at(u, z, t, v, *, p=1.0, c=1e-3):
    """Plain flow matching on the instantaneous velocity u(z, t, t) = v, same weighting."""
    return adaptive_weighted(u(z, t, t) - v, p, c)


def meanflow_loss(u, x, generator, *, P_mean=-0.4, P_std=1.0, ratio_r_neq_t=0.25, p=1.0, c=1e-3,
                  jvp_u=None):
    r, t = sample_r_t(x.shape[0], generator, P_mean=P_mean, P_std=P_std, ratio_r_neq_t=ratio_r_neq_t)
    r, t = r.to(x.dtype).to(x.device), t.to(x.dtype).to(x.device)
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.dtype).to(x.device)
    z, v = linear_path(x, eps, t)
    return meanflow_loss_at(u, z, r, t, v, p=p, c=c, jvp_u=jvp_u)
