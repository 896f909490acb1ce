"""The (r, t) draws and label dropout of the MeanFlow objective against closed forms: separate
logit-normals for r and t (py-meanflow's newer recipe) with either order rule, the MeanFlow JAX code's
layout of each batch (dropped labels on the leading rows, which have r = t), and the default draws
unchanged (the digits rows keep their numbers)."""

import math
import types

import pytest
import torch

from stages.method import meanflow

N = 200_000


def logit(x):
    return torch.log(x) - torch.log1p(-x)


def max_of_two_normals(m1, s1, m2, s2):
    """Mean and std of max(X, Y), X ~ N(m1, s1^2), Y ~ N(m2, s2^2) independent (Clark 1961)."""
    theta = math.sqrt(s1**2 + s2**2)
    a = (m1 - m2) / theta
    cdf, pdf = 0.5 * (1 + math.erf(a / math.sqrt(2))), math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mean = m1 * cdf + m2 * (1 - cdf) + theta * pdf
    second = (m1**2 + s1**2) * cdf + (m2**2 + s2**2) * (1 - cdf) + (m1 + m2) * theta * pdf
    return mean, math.sqrt(second - mean**2)


def test_clip_keeps_ts_own_logit_normal_and_r_its_minimum():
    """py-meanflow's v1 recipe (P_mean_t -0.6, P_std_t 1.6, P_mean_r -4.0, P_std_r 1.6): t keeps
    logit-normal(-0.6, 1.6); r = min(X, Y) on the kept share 0.75 (mean m1 + m2 - E max) and t
    elsewhere, and it differs from t where Y < X as well."""
    r, t = meanflow.sample_r_t(N, torch.Generator().manual_seed(0), P_mean=-0.6, P_std=1.6, P_mean_r=-4.0,
                               P_std_r=1.6, ratio_r_neq_t=0.75, r_above_t="clip")
    lt = logit(t)
    assert lt.mean().item() == pytest.approx(-0.6, abs=0.01) and lt.std().item() == pytest.approx(1.6, rel=0.01)
    y_above = 0.5 * (1 + math.erf(-3.4 / math.sqrt(2 * 1.6**2) / math.sqrt(2)))  # P(Y >= X): Y - X ~ N(-3.4, 2 1.6^2)
    assert (r != t).double().mean().item() == pytest.approx(0.75 * (1 - y_above), abs=0.005)
    mean_max, _ = max_of_two_normals(-0.6, 1.6, -4.0, 1.6)
    assert logit(r).mean().item() == pytest.approx(0.25 * -0.6 + 0.75 * (-0.6 - 4.0 - mean_max), abs=0.02)
    assert bool((r <= t).all())


def test_swap_with_separate_parameters_gives_t_the_maximum_of_the_two():
    _, t = meanflow.sample_r_t(N, torch.Generator().manual_seed(1), P_mean=-0.4, P_std=1.0, P_mean_r=-1.5,
                               P_std_r=0.5)
    mean, std = max_of_two_normals(-0.4, 1.0, -1.5, 0.5)
    lt = logit(t)
    assert lt.mean().item() == pytest.approx(mean, abs=0.01) and lt.std().item() == pytest.approx(std, rel=0.01)
    # the defaults: both draws from (P_mean, P_std), max of two iid normals: m + s / sqrt(pi)
    _, t = meanflow.sample_r_t(N, torch.Generator().manual_seed(2), P_mean=-0.4, P_std=1.0)
    assert logit(t).mean().item() == pytest.approx(-0.4 + 1 / math.sqrt(math.pi), abs=0.01)
    assert logit(t).std().item() == pytest.approx(math.sqrt(1 - 1 / math.pi), rel=0.01)


def test_default_draws_are_the_ones_rows_were_made_with():
    """Unset r parameters and order rule give the draws of the sampler's earlier form, written
    out: two logit-normal draws, sorted, r = t except with probability ratio_r_neq_t."""
    g = torch.Generator().manual_seed(3)
    a = torch.sigmoid(-0.4 + torch.randn(64, generator=g, dtype=torch.float64))
    b = torch.sigmoid(-0.4 + torch.randn(64, generator=g, dtype=torch.float64))
    keep = torch.rand(64, generator=g, dtype=torch.float64) < 0.25
    r, t = meanflow.sample_r_t(64, torch.Generator().manual_seed(3))
    assert torch.equal(t, torch.maximum(a, b)) and torch.equal(r, torch.where(keep, torch.minimum(a, b), t))


def test_leading_rows_take_r_equal_t_and_the_dropped_labels():
    """The JAX code's layout, per micro-batch of n: r = t on the first floor(0.75 n) rows; each of
    the n uniform draws below p drops one label, the first rows first. So dropped rows have r = t
    (while at most 0.75 n are dropped), and the dropped share is p on average."""
    n, p, batches = 16, 0.1, 4000
    g = torch.Generator().manual_seed(4)
    labels = torch.arange(n) % 10
    dropped_total, coupled = 0, True
    for _ in range(batches):
        r, t = meanflow.sample_r_t(n, g, ratio_r_neq_t=0.25, r_equals_t_rows="leading")
        out, dropped = meanflow.drop_labels(labels, 10, p, g, rows="leading")
        assert torch.equal(r[:12], t[:12]) and bool((r[12:] < t[12:]).all())
        k = int(dropped.sum())
        assert torch.equal(dropped, torch.arange(n) < k) and bool((out[:k] == 10).all())
        coupled &= bool((r[dropped] == t[dropped]).all())
        dropped_total += k
    assert coupled
    assert dropped_total / (n * batches) == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / (n * batches)))
    # independent rows: dropped labels fall on r != t rows too
    r, t = meanflow.sample_r_t(4000, torch.Generator().manual_seed(5))
    _, dropped = meanflow.drop_labels(torch.zeros(4000, dtype=torch.int64), 10, p, torch.Generator().manual_seed(6))
    assert bool((r[dropped] != t[dropped]).any())


def test_the_objective_passes_the_layout_to_the_loss(monkeypatch):
    """Objective.from_config with label_dropout_rows leading: in each call the rows the loss gets
    with the null class all have r = t."""
    seen = []
    monkeypatch.setattr(meanflow, "meanflow_loss_at",
                        lambda u, z, r, t, v, labels=None, **kw: seen.append((r, t, labels)) or torch.zeros(len(z)))
    net = types.SimpleNamespace(num_classes=10, null_class=10)
    section = {"P_mean": -0.4, "P_std": 1.0, "ratio_r_neq_t": 0.25, "adaptive_p": 1.0, "adaptive_c": 0.01,
               "label_dropout": 0.3, "label_dropout_rows": "leading"}
    objective = meanflow.Objective.from_config(section, net, "posttrain_mf")
    assert "leading rows" in objective.describe()
    g = torch.Generator().manual_seed(7)
    for _ in range(50):
        objective.loss(None, torch.randn(8, 1, 2, 2), g, labels=torch.randint(0, 10, (8,), generator=g))
    nulls = [(r[y == 10] == t[y == 10]).all().item() for r, t, y in seen]
    assert all(nulls) and sum((y == 10).sum().item() for _, _, y in seen) > 50
