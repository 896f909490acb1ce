"""Flow-matching side: sigma <-> t conversion on the analytic Gaussian, the JVP against a finite
difference in float64, CMT-MF pairs and the MeanFlow loss against hand-computed values."""

import math

import pytest
import torch

from stages import networks
from stages.method import flowmap, losses, meanflow
from stages.networks.average_velocity import AverageVelocity

torch.set_num_threads(1)


def tiny_u(dtype=torch.float64, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    net = networks.build({"kind": "small_unet", "in_channels": 1, "resolution": 4, "channels": 8,
                          "channel_mult": [1, 2], "num_blocks": 1, "dropout": dropout, "dual_time": True})
    # zero-initialised output layers would make u constant; give every weight a value
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    return AverageVelocity(net, sigma_data=0.5).to(dtype)


# ----------------------------------------------------------------------------------------------
# Conversion


def test_scalar_conversions_round_trip():
    sigma = torch.tensor([0.0, 0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    t = flowmap.sigma_to_t(sigma)
    torch.testing.assert_close(t, torch.tensor([0.0, 0.002 / 1.002, 1 / 3, 0.5, 80 / 81], dtype=torch.float64))
    torch.testing.assert_close(flowmap.t_to_sigma(t), sigma)
    with pytest.raises(ValueError, match="sigma = inf"):
        flowmap.t_to_sigma(torch.tensor([1.0]))
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(flowmap.flow_to_edm_state(flowmap.edm_to_flow_state(x, sigma), t), x)


def test_exact_pf_ode_in_sigma_maps_onto_exact_flow_matching_trajectory():
    # data N(mu, s0^2) per pixel: both ODEs have closed forms with the same standardised state xi.
    mu, s0, sigma_max = torch.tensor([0.3, -0.7]).double(), 0.4, 80.0
    x_T = sigma_max * torch.tensor([1.3, -0.2]).double()
    xi = (x_T - mu) / math.sqrt(s0**2 + sigma_max**2)
    sigmas = torch.tensor([80.0, 20.0, 3.0, 0.7, 0.1, 0.002, 0.0], dtype=torch.float64)
    edm = torch.stack([mu + (s0**2 + s**2) ** 0.5 * xi for s in sigmas])  # [K+1, 2]
    states = edm.reshape(1, len(sigmas), 1, 1, 2)
    z, t = flowmap.trajectory_to_flow(states, sigmas, sigma_max)
    assert t[0] == 1 and torch.equal(t[1:], sigmas / (1 + sigmas))
    exact = torch.stack([(1 - tt) * mu + ((1 - tt) ** 2 * s0**2 + tt**2) ** 0.5 * xi for tt in t[1:]])
    torch.testing.assert_close(z[0, 1:].reshape(-1, 2), exact, rtol=1e-12, atol=1e-12)
    # the prepended prior point x_T / sigma_max is the exact z_1 = xi up to mean / sigma_max
    gap = (z[0, 0].flatten() - xi).abs()
    assert bool((gap <= mu.abs() / sigma_max + xi.abs() * s0**2 / sigma_max**2 + 1e-12).all()), gap
    # velocities: EDM denoiser of the Gaussian -> dz/dt of the exact flow-matching path
    for s, tt, x in zip(sigmas[:-1], t[1:-1], edm[:-1], strict=False):
        denoised = mu + s0**2 / (s0**2 + s**2) * (x - mu)
        v = flowmap.edm_velocity(x.reshape(1, 2), denoised.reshape(1, 2), s.reshape(1))
        dz_dt = -mu + (tt - (1 - tt) * s0**2) / ((1 - tt) ** 2 * s0**2 + tt**2) ** 0.5 * xi
        torch.testing.assert_close(v.flatten(), dz_dt, rtol=1e-10, atol=1e-10)


def test_trajectory_to_flow_refuses_a_trajectory_not_starting_at_sigma_max():
    with pytest.raises(ValueError, match="sigma_max"):
        flowmap.trajectory_to_flow(torch.zeros(1, 2, 1, 1, 1), torch.tensor([40.0, 0.002]), 80.0)


# ----------------------------------------------------------------------------------------------
# JVP


def test_jvp_matches_finite_difference_float64():
    u = tiny_u().eval()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    r = torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64)
    t = torch.tensor([0.6, 0.3, 0.9], dtype=torch.float64)
    out, dudt = meanflow.mean_velocity_derivative(u, z, r, t, v)
    torch.testing.assert_close(out, u(z, r, t))
    h = 1e-6
    fd = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
    assert dudt.abs().max() > 1e-2  # a non-trivial derivative
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)


def test_jvp_and_training_forward_share_the_dropout_mask():
    u = tiny_u(torch.float32, dropout=0.5).train()
    z, v = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    r, t = torch.full((4,), 0.2), torch.full((4,), 0.7)
    torch.manual_seed(3)
    with torch.random.fork_rng():
        with torch.no_grad():
            primal, _ = meanflow.mean_velocity_derivative(u, z, r, t, v)
    again = u(z, r, t)
    torch.testing.assert_close(primal, again.detach())
    assert not torch.allclose(again, u(z, r, t))  # dropout is really on


# ----------------------------------------------------------------------------------------------
# Losses


class Affine(torch.nn.Module):
    """u(z, r, t) = a z + b t + c r: du/dt along (v, 0, 1) is a v + b."""

    def __init__(self, a, b, c):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Parameter(torch.tensor(float(v), dtype=torch.float64))
                                  for v in (a, b, c))

    def forward(self, z, r, t):
        return self.a * z + (self.b * t + self.c * r).reshape(-1, 1, 1, 1)


def test_meanflow_loss_hand_values():
    u = Affine(0.5, 2.0, -1.0)
    z = torch.tensor([1.0, -2.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    v = torch.tensor([3.0, 1.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    r, t = torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.6], dtype=torch.float64)
    # u = 0.5 z + 1.2 - 0.2 = (1.5, 0); du/dt = 0.5 v + 2 = (3.5, 2.5)
    # target = v - 0.4 du/dt = (3 - 1.4, 1 - 1.0) = (1.6, 0); delta = (-0.1, 0); |delta|^2 = 0.01
    got = meanflow.meanflow_loss_at(u, z, r, t, v, p=1.0, c=1e-3)
    torch.testing.assert_close(got, torch.tensor([0.01 / 0.011], dtype=torch.float64))
    got.sum().backward()
    # weight detached: d/da of w |delta|^2 = w * 2 delta . z (the target carries no gradient)
    torch.testing.assert_close(u.a.grad, torch.tensor(2 * -0.1 * 1.0 / 0.011, dtype=torch.float64))
    # p = 0: the plain squared error
    torch.testing.assert_close(meanflow.meanflow_loss_at(u, z, r, t, v, p=0.0),
                               torch.tensor([0.01], dtype=torch.float64))


def test_both_jvp_routes_give_the_same_loss_and_gradient():
    # one process: JVP with a graph; several: no-graph JVP on the bare module + graph forward
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    grads = []
    for route in ("graph", "two-pass"):
        u = tiny_u(dropout=0.3).train()
        torch.manual_seed(11)
        gen = torch.Generator().manual_seed(9)
        loss = meanflow.meanflow_loss(u, x, gen, ratio_r_neq_t=1.0, jvp_u=None if route == "graph" else u)
        loss.sum().backward()
        grads.append((loss.detach(), [prm.grad.clone() for prm in u.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_meanflow_loss_with_r_equal_t_is_flow_matching():
    u = tiny_u().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64)
    z, v = meanflow.linear_path(x, eps, t)
    torch.testing.assert_close(v, eps - x)
    torch.testing.assert_close(z, (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps)
    mf = meanflow.meanflow_loss_at(u, z, t.clone(), t, v)
    fm = meanflow.flow_matching_loss_at(u, z, t, v)
    torch.testing.assert_close(mf, fm, rtol=1e-12, atol=0)
    torch.testing.assert_close(meanflow.meanflow_loss_at(u, z, t.clone(), t, v, p=0.0),
                               meanflow.flow_matching_loss_at(u, z, t, v, p=0.0), rtol=1e-12, atol=0)
    # and with r != t it is not (unweighted: the adaptive weight saturates near 1 for large errors)
    assert not torch.allclose(meanflow.meanflow_loss_at(u, z, 0.5 * t, t, v, p=0.0),
                              meanflow.flow_matching_loss_at(u, z, t, v, p=0.0))


def test_sample_r_t_distribution():
    g = torch.Generator().manual_seed(0)
    r, t = meanflow.sample_r_t(40000, g, P_mean=-0.4, P_std=1.0, ratio_r_neq_t=0.25)
    assert bool((r <= t).all()) and bool(((0 < r) & (t < 1)).all())
    assert abs((r != t).double().mean().item() - 0.25) < 0.01
    # t = max of two logit-normal draws: P(t <= sigmoid(-0.4)) = 0.5^2
    assert abs((t <= torch.sigmoid(torch.tensor(-0.4))).double().mean().item() - 0.25) < 0.01
    r0, t0 = meanflow.sample_r_t(100, g, ratio_r_neq_t=0.0)
    assert torch.equal(r0, t0)


def test_cmt_mf_pairs_hand_values():
    # one trajectory, 3 points (noise first): z = (10, 4, 1) at t = (1, 0.5, 0)
    z = torch.tensor([10.0, 4.0, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    t = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    inputs, r, t_in, target = meanflow.cmt_mf_pairs(z, t, 200, torch.Generator().manual_seed(0))
    want = {(10.0, 0.5, 1.0): (10 - 4) / 0.5, (10.0, 0.0, 1.0): 9.0, (4.0, 0.0, 0.5): 6.0}
    seen = set()
    for zi, rj, ti, y in zip(inputs.flatten().tolist(), r.tolist(), t_in.tolist(), target.flatten().tolist(),
                             strict=True):
        assert y == pytest.approx(want[(zi, rj, ti)])
        seen.add((zi, rj, ti))
    assert seen == set(want)  # every ordered pair i > j is drawn, none other
    with pytest.raises(ValueError, match="decrease"):
        meanflow.cmt_mf_pairs(z, t.flip(0), 2, torch.Generator())


def test_cmt_mf_with_t_j_zero_is_cm_endpoint_regression_after_conversion():
    # an EDM trajectory ending at sigma = 0 (t = 0): the CMT-MF loss of the pairs (i, end), times
    # t_i^2, is the CMT-CM squared-l2 loss of the consistency function f = z - t u(z, 0, t) read
    # back in sigma, because ||u - (z_i - z_0) / t_i||^2 t_i^2 = ||(z_i - t_i u) - x_0||^2.
    u = tiny_u().eval()
    g = torch.Generator().manual_seed(2)
    sigmas = torch.tensor([80.0, 8.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    states = torch.randn(2, 5, 1, 4, 4, generator=g, dtype=torch.float64) * (sigmas.view(1, -1, 1, 1, 1) + 0.5)
    z, t = flowmap.trajectory_to_flow(states, sigmas, 80.0)
    inputs, r, t_in, target = meanflow.cmt_mf_pairs(z, t, 40, g)
    at_end = r == 0
    assert at_end.sum() >= 5
    mf = losses.squared_l2_distance(u(inputs, r, t_in), target)[at_end] * t_in[at_end] ** 2

    def consistency(x_sigma, sigma):  # f(x, sigma) of the average-velocity model, in EDM variables
        tt = flowmap.sigma_to_t(sigma)
        zz = flowmap.edm_to_flow_state(x_sigma, sigma)
        return zz - tt.view(-1, 1, 1, 1) * u(zz, torch.zeros_like(tt), tt)

    keep = t_in[at_end] < 1  # the prepended t = 1 point has no EDM state
    x_in = flowmap.flow_to_edm_state(inputs[at_end][keep], t_in[at_end][keep])
    endpoint = target.new_tensor(0) + z[:, -1]  # z_0 = x_0 at t = 0
    rows = [i // 40 for i in torch.nonzero(at_end).flatten().tolist()]
    ends = endpoint[rows][keep]
    cm = losses.squared_l2_distance(consistency(x_in, flowmap.t_to_sigma(t_in[at_end][keep])), ends)
    torch.testing.assert_close(mf[keep], cm, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ends, states[rows, -1][keep])


# ----------------------------------------------------------------------------------------------
# The family key of the schema


def test_mf_family_config_validation():
    from pathlib import Path

    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    repo = Path(__file__).resolve().parents[1]
    schema = str(repo / "workflow" / "schemas" / "config.schema.yaml")
    base = yaml.safe_load((repo / "config" / "default.yaml").read_text())
    row = {**base, **yaml.safe_load((repo / "config" / "rows" / "digits-cmt-mf.yaml").read_text())}
    validate(row, schema)
    assert row["posttrain_mf"]["inits"] == ["cmt", "random"] and row["sampling"]["t_mid"] == 0.5
    validate(base, schema)
    assert base["family"] == "cm"  # the consistency rows need no MeanFlow sections
    for broken, word in ((dict(row, family="dmd"), "family"),
                         ({k: v for k, v in row.items() if k != "midtrain_mf"}, "midtrain_mf"),
                         (dict(row, posttrain_mf={**row["posttrain_mf"], "inits": ["teacher"]}), "teacher"),
                         (dict(row, posttrain_mf={**row["posttrain_mf"], "ratio_r_neq_t": 1.5}), "ratio_r_neq_t")):
        with pytest.raises(WorkflowError, match=word):
            validate(broken, schema)


def test_uniform_shifted_r_t_draws_of_the_mf_rae_configs():
    g = torch.Generator().manual_seed(1)
    s = 6.928  # sqrt(16 * 16 * 768 / 4096), MF-RAE's 256 row
    r, t = meanflow.sample_r_t(40000, g, ratio_r_neq_t=0.25, distribution="uniform", shift=s)
    assert bool((r <= t).all()) and abs((r != t).double().mean().item() - 0.25) < 0.01
    # t = max of two shifted uniforms; the shift is increasing, so P(t <= shift(q)) = q^2
    q = torch.tensor(0.3, dtype=torch.float64)
    shifted = s * q / (1 + (s - 1) * q)
    assert abs((t <= shifted).double().mean().item() - 0.09) < 0.01
    # and the default draw is untouched by the new keys (the digits rows keep their numbers)
    a = meanflow.sample_r_t(64, torch.Generator().manual_seed(2))
    b = meanflow.sample_r_t(64, torch.Generator().manual_seed(2), distribution="logit_normal", shift=1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="distribution"):
        meanflow.sample_r_t(4, g, distribution="beta")


def test_adaptive_weight_forms_hand_values():
    delta = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # ||delta||^2 = 25
    got = meanflow.adaptive_weighted(delta, p=1.0, c=1e-3)
    assert got.item() == pytest.approx(25 / 25.001)
    got = meanflow.adaptive_weighted(delta, p=1.0, c=1e-3, form="mf_rae")
    assert got.item() == pytest.approx(625 / 625.001)
    small = torch.tensor([[0.01, 0.0]], dtype=torch.float64)  # ||delta||^2 = 1e-4
    assert meanflow.adaptive_weighted(small, c=1e-3).item() == pytest.approx(1e-4 / 1.1e-3)
    assert meanflow.adaptive_weighted(small, c=1e-3, form="mf_rae").item() == pytest.approx(1e-8 / (1e-3 + 1e-8))
    # the gradient is that of L / sg(L + c): w dL, with L = ||delta||^4 for mf_rae
    d = delta.clone().requires_grad_(True)
    meanflow.adaptive_weighted(d, c=1e-3, form="mf_rae").sum().backward()
    torch.testing.assert_close(d.grad, (4 * 25 * delta) / 625.001)
