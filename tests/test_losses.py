"""Distances, CMT-CM pairs, ECT and EDM losses against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

# Tiny tensors: intra-op threads only add synchronisation (100x slower on a busy 2-core box).
from stages.method import losses

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------
# Distances


def test_distances_hand_values():
    a = torch.tensor([[[[3.0, 4.0]]], [[[1.0, 1.0]]]])  # [2, 1, 1, 2]
    b = torch.tensor([[[[0.0, 0.0]]], [[[2.0, -1.0]]]])
    # diffs: (3, 4) -> |.|^2 = 25; (-1, 2) -> 5
    torch.testing.assert_close(losses.squared_l2_distance(a, b), torch.tensor([25.0, 5.0]))
    torch.testing.assert_close(losses.l2_distance(a, b), torch.tensor([5.0, math.sqrt(5.0)]))
    torch.testing.assert_close(losses.pseudo_huber_distance(a, b, 1.0),
                               torch.tensor([math.sqrt(26.0) - 1, math.sqrt(6.0) - 1]))
    torch.testing.assert_close(losses.pseudo_huber_distance(a, b, 0.03),
                               torch.tensor([math.sqrt(25.0009) - 0.03, math.sqrt(5.0009) - 0.03]))


def test_distances_are_per_sample_over_all_pixels():
    a = torch.arange(2 * 2 * 3 * 3, dtype=torch.float64).view(2, 2, 3, 3)
    b = torch.zeros_like(a)
    want = torch.tensor([sum(v * v for v in range(18)), sum(v * v for v in range(18, 36))], dtype=torch.float64)
    torch.testing.assert_close(losses.squared_l2_distance(a, b), want)
    torch.testing.assert_close(losses.l2_distance(a, b), want.sqrt())


def test_make_distance():
    a, b = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    assert losses.make_distance("l2")(a, b).item() == pytest.approx(5.0)
    assert losses.make_distance("squared_l2")(a, b).item() == pytest.approx(25.0)
    assert losses.make_distance("pseudo_huber", pseudo_huber_c=2.0)(a, b).item() == pytest.approx(
        math.sqrt(29.0) - 2.0)
    with pytest.raises(ValueError):
        losses.make_distance("l1")


# ----------------------------------------------------------------------------------------------
# CMT-CM


def test_cmt_cm_inputs_layout():
    T, K1 = 2, 4
    states = torch.arange(T * K1, dtype=torch.float64).view(T, K1, 1, 1, 1)  # traj t, point k -> 4t + k
    sigmas = torch.tensor([80.0, 5.0, 0.3, 0.002], dtype=torch.float64)
    x, s, y = losses.cmt_cm_inputs(states, sigmas)
    assert x.shape == (6, 1, 1, 1) and y.shape == (6, 1, 1, 1) and s.shape == (6,)
    assert x.flatten().tolist() == [0, 1, 2, 4, 5, 6]  # trajectory-major, final state excluded
    assert s.tolist() == [80.0, 5.0, 0.3, 80.0, 5.0, 0.3]  # never the final sigma
    assert y.flatten().tolist() == [3, 3, 3, 7, 7, 7]  # each trajectory's own final state


def test_cmt_cm_inputs_multi_pixel_targets():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 5, 2, 2, 2, generator=g)
    sigmas = torch.linspace(4, 0.1, 5)
    x, s, y = losses.cmt_cm_inputs(states, sigmas)
    for t in range(3):
        for k in range(4):
            i = t * 4 + k
            assert torch.equal(x[i], states[t, k])
            assert torch.equal(y[i], states[t, 4])
            assert s[i] == sigmas[k]


def test_cmt_cm_loss_hand_values():
    T, K1 = 2, 4
    states = torch.arange(T * K1, dtype=torch.float64).view(T, K1, 1, 1, 1)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    def identity(x, s):
        return x

    got = losses.cmt_cm_loss(identity, states, sigmas, losses.l2_distance)
    torch.testing.assert_close(got, torch.tensor([3.0, 2.0, 1.0, 3.0, 2.0, 1.0], dtype=torch.float64))

    # f(x, s) = x + s: |4t + k + sigma_k - (4t + 3)|^2 = (k - 3 + sigma_k)^2
    def shift(x, s):
        return x + s.view(-1, 1, 1, 1)

    got = losses.cmt_cm_loss(shift, states, sigmas, losses.squared_l2_distance)
    per_k = [(k - 3 + sigmas[k].item()) ** 2 for k in range(3)]
    torch.testing.assert_close(got, torch.tensor(per_k * 2, dtype=torch.float64))


def test_cmt_cm_loss_gradient_has_no_stop_gradient():
    """The target is data (a solver state), the student sees every pre-final state: grad of the
    mean loss for f = w x is the hand value sum over pairs of d/dw (w x - y)^2 / N."""
    states = torch.tensor([[1.0, 2.0, 5.0]], dtype=torch.float64).view(1, 3, 1, 1, 1)
    sigmas = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    loss = losses.cmt_cm_loss(lambda x, s: w * x, states, sigmas, losses.squared_l2_distance).mean()
    loss.backward()
    # pairs (1 -> 5), (2 -> 5): d/dw mean((w x - 5)^2) = mean(2 x (w x - 5))
    want = (2 * 1 * (1.5 - 5) + 2 * 2 * (3.0 - 5)) / 2
    assert w.grad.item() == pytest.approx(want)


# ----------------------------------------------------------------------------------------------
# ECT


def _r_by_hand(t, stage, q, k=8.0, b=1.0):
    dt = t * (1 + k / (1 + math.exp(b * t))) / q ** (stage + 1)
    return max(0.0, t - dt)


def test_ect_r_hand_values():
    t = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0, 80.0], dtype=torch.float64)
    r = losses.ect_r(t, stage=0, q=4)
    for ti, ri in zip(t.tolist(), r.tolist(), strict=True):
        assert ri == pytest.approx(_r_by_hand(ti, 0, 4), rel=1e-12, abs=1e-15)
    # explicit numbers: t = 1 -> dt = (1 + 8 sigmoid(-1)) / 4
    assert r[2].item() == pytest.approx(1 - (1 + 8 / (1 + math.e)) / 4, rel=1e-12)
    # t = 80: sigmoid(-80) ~ 0, r = 80 (1 - 1/4) = 60
    assert r[5].item() == pytest.approx(60.0, rel=1e-12)


def test_ect_r_clamped_at_zero_where_dt_exceeds_t():
    t = torch.tensor([0.05, 0.1, 0.3], dtype=torch.float64)
    # (1 + 8 sigmoid(-t)) / 4 > 1 for these t: the mapping would go negative
    assert all((1 + 8 / (1 + math.exp(v))) / 4 > 1 for v in t.tolist())
    r = losses.ect_r(t, stage=0, q=4)
    assert torch.equal(r, torch.zeros_like(t))


def test_ect_r_stage_divides_dt_by_q_power():
    t = torch.tensor([0.1, 1.0, 3.0, 20.0], dtype=torch.float64)
    for stage in (0, 1, 2):
        r = losses.ect_r(t, stage=stage, q=4)
        for ti, ri in zip(t.tolist(), r.tolist(), strict=True):
            assert ri == pytest.approx(_r_by_hand(ti, stage, 4), rel=1e-12, abs=1e-15)
    dt0 = t - losses.ect_r(t, stage=0, q=2)
    dt1 = t - losses.ect_r(t, stage=1, q=2)
    assert (dt0[:2] == t[:2]).all()  # clamped: r = 0
    torch.testing.assert_close(dt1[2:], dt0[2:] / 2)  # stage 1 at q=2 halves dt where not clamped
    # q = 4096 (CIFAR): dt ~ t / 4096 for large t
    assert (t[-1] - losses.ect_r(t, 0, 4096)[-1]).item() == pytest.approx(20 / 4096, rel=1e-6)


def test_ect_stage_off():
    assert losses.ect_stage(0, None) == 0
    assert losses.ect_stage(123_456, None) == 0
    assert losses.ect_stage(123_456, 0) == 0


def test_ect_stage_doubles_one_iteration_after_the_multiple():
    # By hand, for ECT's run_ecm.sh (250 ticks of 100 iterations = 25k): the first tick is one
    # iteration (0-based 0), tick k >= 1 holds iterations 100(k - 1) + 1 .. 100k, and after tick k
    # the stage becomes k // 250. Tick 250 ends with iteration 25,000, so 25,001 is the first at stage 1.
    for step, stage in [(0, 0), (1, 0), (24_999, 0), (25_000, 0), (25_001, 1), (50_000, 1),
                        (50_001, 2), (75_000, 2), (75_001, 3)]:
        assert losses.ect_stage(step, 25_000) == stage, step
    # double_every 1 (the smoke rows): iterations 0 and 1 at stage 0, then one more per iteration
    assert [losses.ect_stage(s, 1) for s in range(5)] == [0, 0, 1, 2, 3]


def _official_stages(total_iterations, iterations_per_tick, double_ticks):
    """The stage each iteration runs at, counted as the official ECT loop counts it: images are
    added after each iteration, a tick ends when it has seen its images (tick 0 after one
    iteration), and at the end of a tick the tick counter goes up and the stage becomes
    (counter - 1) // double_ticks."""
    batch = 128
    cur_nimg = cur_tick = tick_start = stage = 0
    stages = []
    for _ in range(total_iterations):
        stages.append(stage)
        cur_nimg += batch
        if cur_tick != 0 and cur_nimg < tick_start + iterations_per_tick * batch:
            continue
        cur_tick += 1
        tick_start = cur_nimg
        stage = max(stage, (cur_tick - 1) // double_ticks)
    return stages


@pytest.mark.parametrize("per_tick,double_ticks", [(100, 3), (7, 2), (1, 1)])
def test_ect_stage_matches_the_official_tick_count(per_tick, double_ticks):
    official = _official_stages(12 * per_tick * double_ticks + 5, per_tick, double_ticks)
    ours = [losses.ect_stage(s, per_tick * double_ticks) for s in range(len(official))]
    assert ours == official
    assert official.index(1) == per_tick * double_ticks + 1


def _draws(seed, batch, shape, P_mean=-1.1, P_std=2.0):
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(batch, generator=g, dtype=torch.float32)
    t = (P_mean + P_std * n).exp()
    eps = torch.randn((batch, *shape), generator=g, dtype=torch.float32)
    return t, eps


def test_ect_loss_hand_value_with_sigma_dependent_student():
    seed, B, shape, q = 7, 32, (1, 2, 2), 4
    y = torch.linspace(-1, 1, B * 4).view(B, *shape)
    def f(x, s):
        return 2 * x + s.view(-1, 1, 1, 1)

    got = losses.ect_loss(f, y, torch.Generator().manual_seed(seed), stage=0, q=q)

    t, eps = _draws(seed, B, shape)
    want = []
    n_zero = 0
    for i in range(B):
        ti = t[i].item()
        ri = _r_by_hand(ti, 0, q)
        pred = 2 * (y[i] + ti * eps[i]) + ti
        if ri > 0:
            target = 2 * (y[i] + ri * eps[i]) + ri
        else:
            target = y[i]
            n_zero += 1
        want.append((pred - target).double().square().sum().sqrt().item() / (ti - ri))
    assert 0 < n_zero < B  # both branches are exercised
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    # closed form where r > 0: ||(t - r)(2 eps + 1)|| / (t - r) = ||2 eps + 1||
    mask = got.new_tensor([_r_by_hand(v, 0, q) > 0 for v in t.tolist()]).bool()
    closed = (2 * eps + 1).flatten(1).norm(dim=1)
    torch.testing.assert_close(got[mask], closed[mask], rtol=1e-3, atol=1e-4)


def test_ect_loss_target_is_y_when_r_is_zero():
    """q = 1: dt = t (1 + 8 sigmoid(-t)) > t everywhere, so r = 0 and the target is y."""
    seed, B, shape = 3, 8, (1, 2, 2)
    y = torch.randn(B, *shape, generator=torch.Generator().manual_seed(99))
    def f(x, s):
        return 0.5 * x + s.view(-1, 1, 1, 1)

    got = losses.ect_loss(f, y, torch.Generator().manual_seed(seed), stage=0, q=1)
    t, eps = _draws(seed, B, shape)
    tt = t.view(-1, 1, 1, 1)
    want = (0.5 * (y + tt * eps) + tt - y).flatten(1).norm(dim=1) / t
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ect_loss_pseudo_huber():
    seed, B, shape, q, c = 5, 8, (1, 2, 2), 64, 0.03
    y = torch.randn(B, *shape, generator=torch.Generator().manual_seed(1))
    def f(x, s):
        return 2 * x + s.view(-1, 1, 1, 1)

    got = losses.ect_loss(f, y, torch.Generator().manual_seed(seed), stage=0, q=q, c=c)
    t, eps = _draws(seed, B, shape)
    want = []
    for i in range(B):
        ti = t[i].item()
        ri = _r_by_hand(ti, 0, q)
        target = 2 * (y[i] + ri * eps[i]) + ri if ri > 0 else y[i]
        d2 = (2 * (y[i] + ti * eps[i]) + ti - target).double().square().sum().item()
        want.append((math.sqrt(d2 + c * c) - c) / (ti - ri))
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-3, atol=1e-5)


class _ScaledStudent(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))
        self.grad_enabled = []

    def forward(self, x, s):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.w * x


def test_ect_loss_gradient_only_through_the_student_branch():
    seed, B, shape, q = 11, 16, (1, 2, 2), 4
    y = torch.randn(B, *shape, generator=torch.Generator().manual_seed(2))
    student = _ScaledStudent(1.3)
    loss = losses.ect_loss(student, y, torch.Generator().manual_seed(seed), stage=0, q=q)
    assert student.grad_enabled == [True, False]  # the prediction first, then the target under no_grad
    loss.mean().backward()

    t, eps = _draws(seed, B, shape)
    w = 1.3
    grads = []
    for i in range(B):
        ti = t[i].item()
        ri = _r_by_hand(ti, 0, q)
        x_t = (y[i] + ti * eps[i]).double()
        target = w * (y[i] + ri * eps[i]).double() if ri > 0 else y[i].double()
        diff = w * x_t - target
        # d/dw ||w x_t - sg(target)|| / (t - r) = <diff, x_t> / (||diff|| (t - r))
        grads.append((diff * x_t).sum().item() / (diff.norm().item() * (ti - ri)))
    want = sum(grads) / B
    assert student.w.grad.item() == pytest.approx(want, rel=1e-3)

    # the same without stop-gradient would differ (so the check above can fail)
    full = []
    for i in range(B):
        ti = t[i].item()
        ri = _r_by_hand(ti, 0, q)
        x_t = (y[i] + ti * eps[i]).double()
        x_r = (y[i] + ri * eps[i]).double() if ri > 0 else torch.zeros_like(x_t)
        target = w * x_r if ri > 0 else y[i].double()
        diff = w * x_t - target
        full.append((diff * (x_t - x_r)).sum().item() / (diff.norm().item() * (ti - ri)))
    assert abs(sum(full) / B - want) > 1e-3 * abs(want)


class _DropoutProbe(torch.nn.Module):
    """Returns x times a dropout mask of ones, recording each mask."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, x, s):
        mask = F.dropout(torch.ones_like(x), p=0.5, training=True)
        self.masks.append(mask.clone())
        return x * mask


def test_ect_loss_target_and_student_share_the_dropout_mask():
    probe = _DropoutProbe()
    y = torch.zeros(8, 1, 4, 4)
    torch.manual_seed(2024)
    losses.ect_loss(probe, y, torch.Generator().manual_seed(0), stage=0, q=4)
    assert len(probe.masks) == 2
    assert torch.equal(probe.masks[0], probe.masks[1])
    assert 0 < (probe.masks[0] == 0).sum() < probe.masks[0].numel()
    # sanity: without the RNG restore two consecutive calls draw different masks
    probe.masks.clear()
    probe(y, None), probe(y, None)
    assert not torch.equal(probe.masks[0], probe.masks[1])


def test_ect_loss_with_real_dropout_network_reproduces_from_global_seed():
    """Same global seed -> same value: the fork leaves the student pass's draws as they were."""
    from stages import networks
    from stages.networks.precond import Precond

    torch.manual_seed(0)
    net = networks.build({"kind": "small_unet", "in_channels": 1, "resolution": 8, "channels": 8,
                          "channel_mult": [1, 2], "num_blocks": 1, "dropout": 0.5})
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.3)
        for block in [*net.enc, *net.mid, *net.dec]:
            if hasattr(block, "conv1"):
                block.conv1.weight.normal_(0, 0.3)
    pre = Precond(net, kind="ecm").train()
    y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    values = []
    for _ in range(2):
        torch.manual_seed(77)
        values.append(losses.ect_loss(pre, y, torch.Generator().manual_seed(1), stage=0, q=2))
    assert torch.equal(values[0], values[1])
    torch.manual_seed(78)
    other = losses.ect_loss(pre, y, torch.Generator().manual_seed(1), stage=0, q=2)
    assert not torch.equal(values[0], other)  # dropout really acts


# ----------------------------------------------------------------------------------------------
# EDM


def test_edm_loss_zero_for_perfect_denoiser():
    y = torch.randn(6, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    got = losses.edm_loss(lambda x, s: y, y, torch.Generator().manual_seed(0), sigma_data=0.5)
    assert got.shape == (6,)
    assert torch.equal(got, torch.zeros(6))


def test_edm_loss_for_zero_denoiser_and_the_noised_input():
    seed, B, sd = 9, 6, 0.5
    y = torch.randn(B, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    seen = {}

    def zero(x, sigma):
        seen["x"], seen["sigma"] = x.clone(), sigma.clone()
        return torch.zeros_like(x)

    got = losses.edm_loss(zero, y, torch.Generator().manual_seed(seed), sigma_data=sd)
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(B, generator=g)
    sigma = (-1.2 + 1.2 * n).exp()
    noise = torch.randn(y.shape, generator=g)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    torch.testing.assert_close(seen["sigma"], sigma)
    torch.testing.assert_close(seen["x"], y + sigma.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(got, weight * y.flatten(1).square().mean(1))
    # the EDM weight at sigma = sigma_data is 2 / sd^2 = 8
    assert ((0.5**2 + sd**2) / (0.5 * sd) ** 2) == pytest.approx(8.0)


def test_pseudo_huber_default_c_scales_with_dimension():
    a, b = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    c = 0.00054 * 8
    expected = torch.full((2,), (64 + c**2) ** 0.5 - c)
    torch.testing.assert_close(losses.make_distance("pseudo_huber")(a, b), expected)
    torch.testing.assert_close(losses.make_distance("pseudo_huber", pseudo_huber_c=1.0)(a, b),
                               torch.full((2,), 65**0.5 - 1))


# ---- ECD and the 512 code's ECT ------------------------------------------------------------------
# Gaussian data of per-dimension variance S2: the exact denoiser is D(x; s) = S2 / (S2 + s^2) x and
# the PF-ODE maps x(t) to x(s) = x(t) sqrt((S2 + s^2) / (S2 + t^2)), so f(x, s) = x sqrt(S2 / (S2 + s^2))
# is the exact consistency function.
S2 = 0.25


def gaussian_denoiser(x, sigma, labels=None):
    s = sigma.view(-1, 1, 1, 1).double() if torch.is_tensor(sigma) else sigma
    return (S2 / (S2 + s**2) * x.double()).to(x.dtype)


def exact_flow(x, t, s):
    return x * ((S2 + s**2) / (S2 + t**2)).sqrt().view(-1, 1, 1, 1)


def test_heun_step_is_heun_and_third_order_on_the_gaussian():
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([2.0, 0.5, 10.0], dtype=torch.float64)
    r = torch.tensor([1.5, 0.45, 9.0], dtype=torch.float64)
    out = losses.heun_step(gaussian_denoiser, x, t, r)
    tt, rr = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    d = x * tt / (S2 + tt**2)  # (x - D) / t
    x1 = x + (rr - tt) * d
    d1 = x1 * rr / (S2 + rr**2)
    torch.testing.assert_close(out, x + (rr - tt) * (d + d1) / 2, rtol=1e-12, atol=1e-12)
    # local error O(h^3): halving the step cuts the error about eightfold
    errors = []
    for h in (0.2, 0.1):
        t1, r1 = torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0 - h], dtype=torch.float64)
        errors.append((losses.heun_step(gaussian_denoiser, x[:1], t1, r1) - exact_flow(x[:1], t1, r1)).abs().max())
    assert 6 < errors[0] / errors[1] < 10
    with pytest.raises(ValueError, match="r must be > 0"):
        losses.heun_step(gaussian_denoiser, x, t, torch.zeros(3, dtype=torch.float64))


def test_guided_denoiser_mixes_teacher_and_guide():
    teacher = lambda x, s: 2 * x  # noqa: E731
    guide = lambda x, s: x + 1  # noqa: E731
    x = torch.randn(2, 1, 2, 2)
    sigma = torch.ones(2)
    torch.testing.assert_close(losses.guided_denoiser(teacher, guide, 2.05)(x, sigma),
                               (x + 1) + 2.05 * (2 * x - (x + 1)))
    torch.testing.assert_close(losses.guided_denoiser(teacher)(x, sigma), 2 * x)
    with pytest.raises(ValueError, match="weight 1"):
        losses.guided_denoiser(teacher, guide, 1.0)


class OffsetConsistency(torch.nn.Module):
    """x sqrt(S2 / (S2 + s^2)) + beta s: the exact consistency function at beta = 0, inconsistent
    otherwise; records whether it was called inside the target context."""

    def __init__(self, beta=0.0):
        super().__init__()
        self.beta = torch.nn.Parameter(torch.tensor(beta, dtype=torch.float64))
        self.in_target_context = False
        self.calls = []

    def forward(self, x, sigma):
        self.calls.append(self.in_target_context)
        s = sigma.view(-1, 1, 1, 1)
        return x * (S2 / (S2 + s**2)).sqrt() + self.beta * s


def draws(y, seed, q, P_mean=-0.8, P_std=1.6):
    """The loss's draws, repeated: t and r in float32 as the loss makes them, eps, x_t."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(y.shape[0], generator=g, dtype=torch.float32)
    t = (P_mean + P_std * n).exp()
    eps = torch.randn(y.shape, generator=g, dtype=torch.float32).double()
    r = (t - t * (1 + 8 * torch.sigmoid(-t)) / q).double()
    t = t.double()
    return t, r, eps, y + t.view(-1, 1, 1, 1) * eps


def by_hand(y, seed, *, q, c, sd, x_r_of, beta):
    t, r, eps, x_t = draws(y, seed, q)
    x_r = x_r_of(y, eps, x_t, t, r)
    f = lambda x, s: x * (S2 / (S2 + s.view(-1, 1, 1, 1) ** 2)).sqrt() + beta * s.view(-1, 1, 1, 1)  # noqa: E731
    diff = (f(x_t, t) - f(x_r, r)).flatten(1).square().sum(1)
    return ((diff + c**2).sqrt() - c) * (1 / t**2 + 1 / sd**2)


def test_ecd_loss_by_hand_on_the_gaussian_teacher():
    y = torch.randn(6, 1, 4, 4, dtype=torch.float64) * S2**0.5
    heun = lambda y, eps, x_t, t, r: losses.heun_step(gaussian_denoiser, x_t, t, r)  # noqa: E731
    for beta in (0.0, 0.3):
        got = losses.ecd_loss(OffsetConsistency(beta), y, torch.Generator().manual_seed(3), gaussian_denoiser,
                              q=16, c=0.06, sigma_data=0.5)
        torch.testing.assert_close(got, by_hand(y, 3, q=16, c=0.06, sd=0.5, x_r_of=heun, beta=beta),
                                   rtol=1e-9, atol=1e-12)
    # the exact consistency function scores near 0 (the Heun step's error only); a wrong one does not
    exact = losses.ecd_loss(OffsetConsistency(0.0), y, torch.Generator().manual_seed(3), gaussian_denoiser, q=1024)
    wrong = losses.ecd_loss(OffsetConsistency(0.3), y, torch.Generator().manual_seed(3), gaussian_denoiser, q=1024)
    assert 100 * exact.max() < wrong.min()


def test_ect_snr_loss_by_hand():
    y = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    shared = lambda y, eps, x_t, t, r: y + r.view(-1, 1, 1, 1) * eps  # noqa: E731
    got = losses.ect_snr_loss(OffsetConsistency(0.2), y, torch.Generator().manual_seed(1), q=1024, c=0.06)
    torch.testing.assert_close(got, by_hand(y, 1, q=1024, c=0.06, sd=0.5, x_r_of=shared, beta=0.2),
                               rtol=1e-9, atol=1e-12)


def test_ecd_target_is_stop_gradient_inside_the_target_context():
    """Only the prediction carries gradient; the target pass runs inside target_context (EDM2:
    forced weight normalisation off) and the prediction pass outside it."""
    import contextlib

    y = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    student = OffsetConsistency(0.3)

    @contextlib.contextmanager
    def target_context():
        student.in_target_context = True
        try:
            yield
        finally:
            student.in_target_context = False

    loss = losses.ecd_loss(student, y, torch.Generator().manual_seed(0), gaussian_denoiser, q=64,
                           target_context=target_context).mean()
    assert student.calls == [False, True]  # the prediction first, then the target in its context
    loss.backward()
    # by hand with the target detached
    t, r, eps, x_t = draws(y, 0, 64)
    x_r = losses.heun_step(gaussian_denoiser, x_t, t, r)
    beta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    f = lambda x, s, b: x * (S2 / (S2 + s.view(-1, 1, 1, 1) ** 2)).sqrt() + b * s.view(-1, 1, 1, 1)  # noqa: E731
    dist = ((f(x_t, t, beta) - f(x_r, r, 0.3)).flatten(1).square().sum(1) + 0.06**2).sqrt() - 0.06
    (dist * (1 / t**2 + 4)).mean().backward()
    torch.testing.assert_close(student.beta.grad, beta.grad)


# ----------------------------------------------------------------------------------------------
# The parts a loss reports (`terms`, the metrics log's term/<name>): they make up the loss, and asking
# for them changes nothing the loss computes


def _student(x, sigma, labels=None):
    """A made-up consistency function: smooth in x and sigma, no parameters."""
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s) + 0.1 * torch.tanh(x)


@pytest.mark.parametrize("name", ["edm", "ect", "ect_pseudo_huber", "ecd", "ect_snr"])
def test_loss_terms_make_up_the_loss_and_leave_it_unchanged(name):
    y = torch.randn(6, 1, 4, 4)

    def teacher(x, s, labels=None):
        return 0.9 * x / (1 + s[:, None, None, None])

    calls = {
        "edm": lambda g, terms: losses.edm_loss(_student, y, g, 0.5, terms=terms),
        "ect": lambda g, terms: losses.ect_loss(_student, y, g, stage=1, q=4, terms=terms),
        "ect_pseudo_huber": lambda g, terms: losses.ect_loss(_student, y, g, stage=0, q=2, c=0.03, terms=terms),
        "ecd": lambda g, terms: losses.ecd_loss(_student, y, g, teacher, terms=terms),
        "ect_snr": lambda g, terms: losses.ect_snr_loss(_student, y, g, q=64, terms=terms),
    }
    plain = calls[name](torch.Generator().manual_seed(1), None)
    terms = {}
    noted = calls[name](torch.Generator().manual_seed(1), terms)
    assert torch.equal(plain, noted)
    first, second = ("error", "weight") if name == "edm" else ("distance", "weight")
    assert sorted(terms) == sorted([first, second])
    torch.testing.assert_close(terms[first] * terms[second], plain, rtol=1e-6, atol=0)
    assert all(not t.requires_grad and t.shape == plain.shape for t in terms.values())


def test_cmt_cm_terms_are_the_first_and_last_points_distances():
    states = torch.randn(3, 5, 1, 4, 4)  # 3 trajectories of K = 4 pre-final points
    sigmas = torch.tensor([80.0, 5.0, 0.5, 0.05, 0.002])
    terms = {}
    d = losses.cmt_cm_loss(_student, states, sigmas, losses.l2_distance, terms=terms)
    assert torch.equal(d, losses.cmt_cm_loss(_student, states, sigmas, losses.l2_distance))
    per_point = d.view(3, 4)
    assert torch.equal(terms["distance_first"], per_point[:, 0])
    assert torch.equal(terms["distance_last"], per_point[:, 3])
    # by hand: the first point of trajectory 1 against its final state
    by_hand = (_student(states[1, :1], sigmas[:1]) - states[1, 4:]).flatten().norm()
    torch.testing.assert_close(terms["distance_first"][1], by_hand)


@pytest.mark.parametrize("form", ["meanflow", "mf_rae"])
def test_meanflow_terms_are_the_raw_error_and_the_adaptive_weight(form):
    from stages.method import meanflow

    delta = torch.randn(5, 2, 3, 3)
    terms = {}
    out = meanflow.adaptive_weighted(delta, p=0.75, c=1e-2, form=form, terms=terms)
    assert torch.equal(out, meanflow.adaptive_weighted(delta, p=0.75, c=1e-2, form=form))
    error = delta.flatten(1).square().sum(1)
    torch.testing.assert_close(terms["error"], error)
    L = error if form == "meanflow" else error.square()
    torch.testing.assert_close(terms["adaptive_weight"], 1 / (L + 1e-2) ** 0.75)
    torch.testing.assert_close(terms["adaptive_weight"] * L, out)
