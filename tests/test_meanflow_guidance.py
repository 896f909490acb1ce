"""Classifier-free guidance in the MeanFlow target: the mixing against hand-computed values, the t
interval, label dropout to the null class, omega = 1 / kappa = 0 as the unguided target, and the
labels through both JVP routes and CMT-MF."""

import pytest
import torch

from stages import networks
from stages.method import meanflow
from stages.networks.average_velocity import AverageVelocity

torch.set_num_threads(1)

XL2 = meanflow.Guidance(omega=0.2, kappa=0.92, t_min=0.0, t_max=0.75)


class ClassAffine(torch.nn.Module):
    """u(z, r, t | y) = a z + b t + c r + drop(e_y): u(z, t, t | y) = a z + (b + c) t + e_y and
    du/dt along (w, 0, 1) = a w + b. Classes 0, 1; the null class is 2."""

    num_classes, null_class = 2, 2

    def __init__(self, a=0.5, b=2.0, c=-1.0, e=(0.1, -0.3, 0.7), dropout=0.0):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in (a, b, c))
        self.e = torch.nn.Parameter(torch.tensor(e, dtype=torch.float64))
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, z, r, t, labels):
        return self.a * z + (self.b * t + self.c * r + self.drop(self.e[labels])).reshape(-1, 1, 1, 1)


def column(*values):
    return torch.tensor(values, dtype=torch.float64).reshape(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# The mixing


def test_guided_velocity_hand_values():
    v, u_cond, u_uncond = column(1.0, -2.0), column(0.5, 0.5), column(-1.0, 3.0)
    # 0.2 v + 0.92 u_c - 0.12 u_u = (0.2 + 0.46 + 0.12, -0.4 + 0.46 - 0.36)
    torch.testing.assert_close(meanflow.guided_velocity(v, u_cond, u_uncond, 0.2, 0.92), column(0.78, -0.30))
    # kappa = 0, plain CFG at scale 3: 3 v - 2 u_u
    torch.testing.assert_close(meanflow.guided_velocity(v, None, u_uncond, 3.0, 0.0), column(5.0, -12.0))
    assert XL2.effective_scale == pytest.approx(2.5)


def hand_case():
    # sample: z, t, r, v, label, dropped
    #   0: inside the interval, kept
    #   1: t = 0.9 > t_max = 0.75: unguided
    #   2: dropped to the null class: unguided
    #   3: t = 0.75 exactly: inside (the interval is closed)
    z = column(1.0, 0.5, -1.0, -2.0)
    t = torch.tensor([0.6, 0.9, 0.3, 0.75], dtype=torch.float64)
    r = torch.tensor([0.2, 0.1, 0.3, 0.5], dtype=torch.float64)
    v = column(3.0, -1.0, 2.0, 1.0)
    labels = torch.tensor([0, 1, 0, 1])
    dropped = torch.tensor([False, False, True, False])
    return z, t, r, v, labels, dropped


def test_cfg_velocity_hand_values_interval_and_dropped_rows():
    u = ClassAffine()
    z, t, r, v, labels, dropped = hand_case()
    got = meanflow.cfg_velocity(u, z, t, v, labels, dropped, 2, XL2)
    # 0: u_c = 0.5 + 1 * 0.6 + 0.1 = 1.2, u_u = 0.5 + 0.6 + 0.7 = 1.8
    #    0.2 * 3 + 0.92 * 1.2 - 0.12 * 1.8 = 0.6 + 1.104 - 0.216 = 1.488
    # 3: u_c = -1 + 0.75 - 0.3 = -0.55, u_u = -1 + 0.75 + 0.7 = 0.45
    #    0.2 * 1 + 0.92 * -0.55 - 0.12 * 0.45 = 0.2 - 0.506 - 0.054 = -0.36
    torch.testing.assert_close(got, column(1.488, -1.0, 2.0, -0.36), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1:3], v[1:3])  # untouched, not recomputed

    # the loss on top: target = v~ - (t - r)(a v~ + b), u = a z + b t + c r + e_y (dropped row: e_null)
    labels_in = torch.where(dropped, torch.tensor(2), labels)
    loss = meanflow.meanflow_loss_at(u, z, r, t, got, p=0.0, labels=labels_in)
    u_vals = [0.5 + 1.2 - 0.2 + 0.1, 0.25 + 1.8 - 0.1 - 0.3, -0.5 + 0.6 - 0.3 + 0.7, -1 + 1.5 - 0.5 - 0.3]
    targets = [1.488 - 0.4 * (0.5 * 1.488 + 2), -1.0 - 0.8 * (0.5 * -1.0 + 2), 2.0 - 0.0,
               -0.36 - 0.25 * (0.5 * -0.36 + 2)]
    want = torch.tensor([(a - b) ** 2 for a, b in zip(u_vals, targets, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


def test_interval_with_a_lower_bound():
    u = ClassAffine()
    g = torch.Generator().manual_seed(0)
    n = 200
    z = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    v = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (n,), generator=g)
    guidance = meanflow.Guidance(omega=2.0, t_min=0.3, t_max=0.8)
    got = meanflow.cfg_velocity(u, z, t, v, labels, torch.zeros(n, dtype=torch.bool), 2, guidance)
    inside = (t >= 0.3) & (t <= 0.8)
    assert 50 < inside.sum() < 150
    u_uncond = 0.5 * z + (1.0 * t + 0.7).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(got[inside], (2 * v - u_uncond)[inside], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[~inside], v[~inside])


def test_guidance_runs_without_dropout_and_restores_train_mode():
    u = ClassAffine(dropout=0.9).train()
    z, t, r, v, labels, dropped = hand_case()
    got = meanflow.cfg_velocity(u, z, t, v, labels, dropped, 2, XL2)
    torch.testing.assert_close(got, column(1.488, -1.0, 2.0, -0.36), rtol=1e-12, atol=1e-12)
    assert u.training and u.drop.training


def test_guidance_settings_are_checked():
    for bad in ({"omega": 0.2, "kappa": 1.0}, {"omega": 0.0}, {"omega": 1.0, "t_min": 0.8, "t_max": 0.5},
                {"omega": 1.0, "t_max": 1.5}):
        with pytest.raises(ValueError, match="guidance"):
            meanflow.Guidance(**bad)


# ----------------------------------------------------------------------------------------------
# Label dropout


def test_label_dropout_rate_and_null_class():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 1000, (200_000,), generator=g)
    out, dropped = meanflow.drop_labels(labels, 1000, 0.1, g)
    assert abs(dropped.double().mean().item() - 0.1) < 0.003  # 4.5 standard errors
    assert bool((out[dropped] == 1000).all()) and torch.equal(out[~dropped], labels[~dropped])
    none, mask = meanflow.drop_labels(labels, 1000, 0.0, g)
    assert torch.equal(none, labels) and not mask.any()
    with pytest.raises(ValueError, match="0..1000"):
        meanflow.drop_labels(torch.tensor([3, 1001]), 1000, 0.1, g)
    with pytest.raises(ValueError, match="int64"):
        meanflow.drop_labels(torch.tensor([3.0]), 1000, 0.1, g)
    with pytest.raises(ValueError, match="dropout"):
        meanflow.drop_labels(labels, 1000, 1.0, g)


# ----------------------------------------------------------------------------------------------
# The loss with labels


def tiny_u(seed=0):
    torch.manual_seed(seed)
    net = networks.build({"kind": "dit", "resolution": 8, "in_channels": 4, "num_classes": 10, "patch_size": 2,
                          "hidden_size": 32, "depth": 2, "num_heads": 2}).double()
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    return AverageVelocity(net)


def batch(n=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def loss_of(u, x, labels, guidance, seed=5, **kw):
    # p = 0: the plain squared error (the adaptive weight flattens large errors to about 1)
    return meanflow.meanflow_loss(u, x, torch.Generator().manual_seed(seed), ratio_r_neq_t=0.5, labels=labels,
                                  null_class=10, label_dropout=0.1, guidance=guidance, p=0.0, **kw)


def test_omega_one_kappa_zero_is_the_unguided_target_exactly():
    u = tiny_u().eval()
    x, labels = batch()
    plain = loss_of(u, x, labels, None)
    assert torch.equal(loss_of(u, x, labels, meanflow.Guidance(omega=1.0, kappa=0.0)), plain)
    assert not torch.allclose(loss_of(u, x, labels, meanflow.Guidance(omega=2.0)), plain)
    assert not torch.allclose(loss_of(u, x, labels, XL2), plain)


def test_meanflow_loss_composes_dropout_guidance_and_target_in_order():
    u = tiny_u().eval()
    x, labels = batch(32)
    got = loss_of(u, x, labels, XL2)
    g = torch.Generator().manual_seed(5)
    r, t = meanflow.sample_r_t(32, g, ratio_r_neq_t=0.5)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float32).double()
    z, v = meanflow.linear_path(x, eps, t)
    labels_in, dropped = meanflow.drop_labels(labels, 10, 0.1, g)
    assert dropped.any() and bool((labels_in[dropped] == 10).all())
    v_tilde = meanflow.cfg_velocity(u, z, t, v, labels, dropped, 10, XL2)
    assert not torch.equal(v_tilde, v) and torch.equal(v_tilde[dropped], v[dropped])
    torch.testing.assert_close(got, meanflow.meanflow_loss_at(u, z, r, t, v_tilde, p=0.0, labels=labels_in),
                               rtol=0, atol=0)


def test_both_jvp_routes_agree_with_labels_and_guidance():
    x, labels = batch()
    results = []
    for route in ("graph", "two-pass"):
        u = tiny_u()
        loss = loss_of(u, x, labels, XL2, jvp_u=None if route == "graph" else u)
        loss.sum().backward()
        results.append((loss.detach(), [p.grad.clone() for p in u.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_labels_are_required_for_guidance_and_dropout():
    u = tiny_u()
    x, labels = batch()
    with pytest.raises(ValueError, match="need class labels"):
        meanflow.meanflow_loss(u, x, torch.Generator(), guidance=XL2)
    with pytest.raises(ValueError, match="null_class"):
        meanflow.meanflow_loss(u, x, torch.Generator(), labels=labels)


def test_cmt_mf_loss_gives_each_pair_its_trajectorys_label():
    u = ClassAffine()
    z = torch.randn(2, 3, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    got = meanflow.cmt_mf_loss(u, z, t, 4, torch.Generator().manual_seed(0), labels=labels)
    inputs, r, t_in, target = meanflow.cmt_mf_pairs(z, t, 4, torch.Generator().manual_seed(0))
    want = (u(inputs, r, t_in, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])) - target).flatten(1).square().sum(1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    swapped = meanflow.cmt_mf_loss(u, z, t, 4, torch.Generator().manual_seed(0), labels=1 - labels)
    assert not torch.allclose(got, swapped)
