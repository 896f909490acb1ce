"""MeanFlow distillation (posttrain_mf.target teacher): the teacher's velocity v(z_t, t) replaces
eps - x. Checked on Gaussian data, where the exact EDM denoiser and the exact flow-matching velocity
E[eps - x | z_t] have closed forms derived independently of the sigma <-> t conversion; the target
against a finite-difference du/dt; the data route against itself with and without the new key."""

import copy
import json

import pytest
import torch
from stagekit import REPO, make_dataset, make_teacher, run_in_process
from test_meanflow import tiny_u

from stages.config import resolve, stage_configs
from stages.files import checkpoints
from stages.method import meanflow, teacher_velocity

torch.set_num_threads(1)

MU, S0 = 0.3, 0.5  # data N(MU, S0^2) in every pixel


class GaussianDenoiser(torch.nn.Module):
    """The exact EDM denoiser of N(mu, s0^2) data: D(x; sigma) = mu + s0^2 / (s0^2 + sigma^2) (x - mu)."""

    def __init__(self, mu, s0):
        super().__init__()
        self.mu, self.s0 = mu, s0

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return self.mu + self.s0**2 / (self.s0**2 + s**2) * (x - self.mu)


def exact_flow_velocity(z, t, mu, s0):
    """E[eps - x | z_t] for z_t = (1 - t) x + t eps, x ~ N(mu, s0^2), eps ~ N(0, 1), by Gaussian
    conditioning: Var z = (1 - t)^2 s0^2 + t^2, Cov(x, z) = (1 - t) s0^2, Cov(eps, z) = t."""
    tt = t.reshape(-1, 1, 1, 1).to(torch.float64)
    var = (1 - tt) ** 2 * s0**2 + tt**2
    centred = z.to(torch.float64) - (1 - tt) * mu
    return (tt / var - (1 - tt) * s0**2 / var) * centred - mu


def test_edm_teacher_velocity_of_gaussian_data_is_the_exact_flow_matching_velocity():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.002, 0.1, 0.5, 0.9, 80 / 81, 0.999], dtype=torch.float64)
    z = torch.randn(len(t), 1, 2, 2, generator=g, dtype=torch.float64)
    field = teacher_velocity.edm_velocity_field(GaussianDenoiser(MU, S0))
    v = field(z, t)
    assert v.dtype == z.dtype
    # the denoiser runs in float32, as a teacher does, and v = (z - D) / t divides its rounding by t
    err = (v - exact_flow_velocity(z, t, MU, S0)).flatten(1).abs().max(1).values
    assert bool((err <= 1e-6 / t).all()), err
    with pytest.raises(ValueError, match="unconditional"):
        field(z, t, torch.zeros(len(t), dtype=torch.int64))


def test_meanflow_teacher_velocity_is_its_average_velocity_over_an_empty_interval():
    u = tiny_u(torch.float32).eval()
    z = torch.randn(3, 1, 4, 4)
    t = torch.tensor([0.2, 0.5, 0.95])
    field = teacher_velocity.velocity_field(u, {"precond": "meanflow"})
    torch.testing.assert_close(field(z, t), u(z, t, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="precond edm"):
        teacher_velocity.velocity_field(u, {"precond": "ecm"})


def draws(n, x, seed):
    """The (r, t, eps) meanflow_loss draws for x from a generator seeded `seed`, in its order."""
    g = torch.Generator().manual_seed(seed)
    r, t = meanflow.sample_r_t(n, g)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)
    return r.to(x.dtype), t.to(x.dtype), eps


def test_distillation_target_against_a_finite_difference_with_the_exact_teacher():
    u = tiny_u()
    x = MU + S0 * torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    field = teacher_velocity.edm_velocity_field(GaussianDenoiser(MU, S0))
    # p = 0: the plain squared error, which the adaptive weight would flatten to about 1
    loss = meanflow.meanflow_loss(u, x, torch.Generator().manual_seed(5), ratio_r_neq_t=1.0, p=0.0, teacher=field)

    g = torch.Generator().manual_seed(5)
    r, t = meanflow.sample_r_t(6, g, ratio_r_neq_t=1.0)
    r, t = r.to(x.dtype), t.to(x.dtype)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)
    tt = t.reshape(-1, 1, 1, 1)
    z = (1 - tt) * x + tt * eps
    v = exact_flow_velocity(z, t, MU, S0)
    h = 1e-5  # central difference of u along (v, 0, 1)
    dudt = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
    with torch.no_grad():
        delta = u(z, r, t) - (v - (t - r).reshape(-1, 1, 1, 1) * dudt)
    sq = delta.flatten(1).square().sum(1)
    torch.testing.assert_close(loss.detach(), sq, rtol=1e-6, atol=0)
    # the teacher's velocity is not eps - x: the data route gives another loss
    data = meanflow.meanflow_loss(u, x, torch.Generator().manual_seed(5), ratio_r_neq_t=1.0, p=0.0)
    assert ((data.detach() - loss.detach()).abs() / loss.detach()).min() > 0.01


def test_a_point_mass_teacher_is_meanflow_from_data():
    # data at one point x0: eps - x = (z_t - x0) / t exactly, which is the exact teacher's velocity,
    # so distillation from it is MeanFlow from data (a wrong z, t or tangent would break it)
    u = tiny_u()
    x = torch.full((5, 1, 4, 4), MU, dtype=torch.float64)
    field = teacher_velocity.edm_velocity_field(GaussianDenoiser(MU, 0.0))
    for ratio in (0.25, 1.0):
        distilled = meanflow.meanflow_loss(u, x, torch.Generator().manual_seed(3), ratio_r_neq_t=ratio, teacher=field)
        data = meanflow.meanflow_loss(u, x, torch.Generator().manual_seed(3), ratio_r_neq_t=ratio)
        torch.testing.assert_close(distilled, data, rtol=1e-5, atol=1e-8)


def test_the_teacher_draws_nothing_and_gets_the_dropped_labels():
    net = tiny_dit()
    x = torch.randn(8, 1, 8, 8)
    labels = torch.arange(8) % 10
    seen = []

    def field(z, t, y=None):
        seen.append(y.clone())
        return -z

    kw = {"labels": labels, "null_class": net.null_class, "label_dropout": 0.5, "label_dropout_rows": "leading"}
    g_data, g_teacher = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    meanflow.meanflow_loss(net, x, g_data, **kw)
    meanflow.meanflow_loss(net, x, g_teacher, teacher=field, **kw)
    assert torch.equal(g_data.get_state(), g_teacher.get_state())
    (y,) = seen
    nulls = int((y == net.null_class).sum())
    assert 0 < nulls < 8 and bool((y[:nulls] == net.null_class).all()) and torch.equal(y[nulls:], labels[nulls:])


def tiny_dit():
    from stages import networks
    from stages.networks.average_velocity import AverageVelocity

    torch.manual_seed(0)
    net = networks.build({"kind": "dit", "depth": 1, "hidden_size": 32, "patch_size": 4, "num_heads": 2,
                          "num_classes": 10, "in_channels": 1, "resolution": 8, "dropout": 0.0, "dual_time": True})
    return AverageVelocity(net)


SECTION = {"P_mean": -0.4, "P_std": 1.0, "ratio_r_neq_t": 0.25, "adaptive_p": 1.0, "adaptive_c": 1e-3}


def test_the_data_route_is_the_same_with_the_key_unset_or_data():
    u = tiny_u(torch.float32)
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    plain = meanflow.meanflow_loss(u, x, torch.Generator().manual_seed(9))
    for section in (SECTION, {**SECTION, "target": "data"}):
        mf = meanflow.Objective.from_config(section, net=u, what="posttrain_mf")
        assert mf.teacher is None and "distilled" not in mf.describe()
        assert torch.equal(mf.loss(u, x, torch.Generator().manual_seed(9)), plain)


def test_the_objective_checks_target_and_teacher():
    u = tiny_u(torch.float32)
    field = teacher_velocity.meanflow_velocity_field(u)
    mf = meanflow.Objective.from_config({**SECTION, "target": "teacher"}, net=u, what="posttrain_mf", teacher=field)
    assert mf.teacher is field and "teacher's velocity" in mf.describe()
    with pytest.raises(ValueError, match="posttrain_mf.target teacher: MeanFlow distillation needs"):
        meanflow.Objective.from_config({**SECTION, "target": "teacher"}, net=u, what="posttrain_mf")
    with pytest.raises(ValueError, match="takes no teacher"):
        meanflow.Objective.from_config(SECTION, net=u, what="posttrain_mf", teacher=field)
    with pytest.raises(ValueError, match="target 'noise'"):
        meanflow.Objective.from_config({**SECTION, "target": "noise"}, net=u, what="posttrain_mf")


# ----------------------------------------------------------------------------------------------
# The stage: posttrain_mf with --teacher, and the config key


def mf_row(**posttrain_mf):
    """The digits MeanFlow row cut to two steps, with `posttrain_mf` overrides."""
    return resolve([REPO / "config" / "rows" / "digits-cmt-mf.yaml"], command_line={"posttrain_mf": {
        "steps": 2, "batch": 8, "snapshots": [1.0], "equal_total_budget": False, **posttrain_mf}})


def test_the_key_is_absent_from_the_stage_config_unless_set():
    assert "target" not in stage_configs.stage_config("posttrain_mf", mf_row(), "random")["posttrain_mf"]
    assert stage_configs.stage_config("posttrain_mf", mf_row(target="teacher"), "cmt")["posttrain_mf"]["target"] == \
        "teacher"


def test_training_seed_moves_the_students_and_not_the_teacher():
    base, seeded = mf_row(), copy.deepcopy(mf_row())
    seeded["training_seed"] = 3
    for rule in ("midtrain_mf", "posttrain_mf"):
        assert stage_configs.stage_config(rule, base, "cmt")["seed"] == 0
        assert stage_configs.stage_config(rule, seeded, "cmt")["seed"] == 3
    for rule in ("train_teacher", "trajectory_spec"):
        assert stage_configs.stage_config(rule, seeded) == stage_configs.stage_config(rule, base)


def test_posttrain_mf_distils_an_edm_teacher(tmp_path):
    digits = make_dataset(tmp_path / "digits")
    teacher = make_teacher(tmp_path / "teacher.safetensors")
    distil = stage_configs.stage_config("posttrain_mf", mf_row(target="teacher"), "random")

    def args(cfg, out, *extra):
        return ["--config", json.dumps(cfg), "--init", "random", "--init-model", teacher, "--dataset", digits,
                "--out", tmp_path / out / "model.safetensors", "--snapshots", tmp_path / out / "snapshots", *extra]

    run_in_process("stages.posttrain_mf", args(distil, "mfd", "--teacher", teacher))
    meta = checkpoints.read_meta(tmp_path / "mfd" / "model.safetensors")
    assert meta["inputs"]["teacher"]["sha256"] == checkpoints.read_meta(teacher)["sha256"]
    assert meta["images_seen"] == 2 * 8
    with pytest.raises(ValueError, match="pass --teacher"):
        run_in_process("stages.posttrain_mf", args(distil, "none"))
    data = stage_configs.stage_config("posttrain_mf", mf_row(), "random")
    with pytest.raises(ValueError, match="MeanFlow from data distils nothing"):
        run_in_process("stages.posttrain_mf", args(data, "data", "--teacher", teacher))
