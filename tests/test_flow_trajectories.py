"""Flow-time trajectories of a MeanFlow teacher (trajectories.solver: meanflow): the generator's
states against the exact flow of an analytic Gaussian, labels and label dropout folded from the
seed, the shard round trip (`times.npy`), and the spot check regenerating them with the stored
teacher (and refusing a shard that is not its own)."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from stages.core import rng
from stages.data import labels as class_labels
from stages.data import shards
from stages.files import checkpoints
from stages.method import solvers, trajectories

MU = torch.tensor([[0.3], [-1.0], [0.8]], dtype=torch.float64)  # per class (1 channel); row 3 = null: 0
S = 0.6
SPEC = {"solver": "meanflow", "nfe": 8, "x_T": "noise", "seed": 3, "per_shard": 5, "batch": 5,
        "dtype": "float32", "sigma_max": 80.0, "sigma_min": 0.002, "teacher_key": "k-mf", "code": 1}
DIT = {"kind": "dit", "in_channels": 1, "resolution": 8, "depth": 1, "hidden_size": 32, "patch_size": 2,
       "num_heads": 2, "num_classes": 3, "dropout": 0.0, "dual_time": True}


class ExactTeacher(nn.Module):
    """The exact average velocity of data x | y ~ N(MU_y, S^2 I) (the null class: N(0, S^2 I))."""

    num_classes, null_class = 3, 3

    def forward(self, z, r, t, labels):
        mu = torch.cat([MU, torch.zeros(1, 1, dtype=MU.dtype)])[labels].view(-1, 1, 1, 1).to(z.dtype)
        spread = lambda s: ((1 - s) ** 2 * S**2 + s**2) ** 0.5  # noqa: E731
        rr, tt = r.view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)
        z_r = (1 - rr) * mu + spread(rr) / spread(tt) * (z - (1 - tt) * mu)
        return (z - z_r) / (tt - rr)


META = {"architecture": {"in_channels": 1, "resolution": 4}, "precond": "meanflow"}


def test_flow_time_states_are_the_exact_flow_from_the_seeded_noise():
    gen = trajectories.Generator(ExactTeacher(), META, SPEC, torch.device("cpu"))
    out = gen.batch([0, 7, 11])
    times = solvers.flow_time_grid(8).numpy()
    for i, states, grid, meta in out:
        np.testing.assert_array_equal(grid, times)
        eps = torch.randn((1, 4, 4), generator=rng.generator(SPEC["seed"], i, "x_T")).double()
        label = class_labels.random_label(SPEC["seed"], i, 3)
        assert meta == {"index": i, "seed": SPEC["seed"], "label": label}
        tt = torch.from_numpy(times).view(-1, 1, 1, 1)
        exact = (1 - tt) * MU[label].item() + ((1 - tt) ** 2 * S**2 + tt**2).sqrt() * eps
        # float32 sampler (the generator runs the teacher in float32); the exact map composes exactly
        np.testing.assert_allclose(states, exact.numpy(), rtol=0, atol=2e-5)


def test_label_dropout_gives_the_null_class_at_its_rate_and_the_unconditional_flow():
    spec = {**SPEC, "label_dropout": 0.3}
    gen = trajectories.Generator(ExactTeacher(), META, spec, torch.device("cpu"))
    labels = [gen.start_point(i)[1]["label"] for i in range(400)]
    dropped = np.mean([label == 3 for label in labels])
    assert 0.22 < dropped < 0.38  # 0.3 +- 3.5 standard deviations of 400 draws
    # the kept labels are the ones without dropout: dropout replaces, it does not redraw
    plain = trajectories.Generator(ExactTeacher(), META, SPEC, torch.device("cpu"))
    assert all(a == 3 or a == plain.start_point(i)[1]["label"] for i, a in enumerate(labels))
    i = labels.index(3)
    (_, states, _, _), = gen.batch([i])
    eps = torch.randn((1, 4, 4), generator=rng.generator(SPEC["seed"], i, "x_T"))
    np.testing.assert_allclose(states[-1], (S * eps).numpy(), atol=2e-5)


def test_kinds_and_teachers_must_match():
    with pytest.raises(ValueError, match="MeanFlow teacher"):
        trajectories.Generator(ExactTeacher(), {**META, "precond": "edm"}, SPEC, torch.device("cpu"))
    with pytest.raises(ValueError, match="use solver"):
        trajectories.Generator(ExactTeacher(), META, {**SPEC, "solver": "dpm_solver_pp"}, torch.device("cpu"))
    with pytest.raises(ValueError, match="x_T"):
        trajectories.Generator(ExactTeacher(), META, {**SPEC, "x_T": "data_plus_noise"}, torch.device("cpu"))


@pytest.fixture(scope="module")
def mf_teacher(tmp_path_factory):
    torch.manual_seed(0)
    meta = {"key": "k-mf", "architecture": DIT, "precond": "meanflow", "sigma_data": 0.5, "sigma_min": 0.002,
            "sigma_max": 80.0, "time": "flow_t"}
    net = checkpoints.build(meta)
    with torch.no_grad():  # a non-trivial u: perturb the zero-initialised output layer and modulations
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("mf-teacher") / "model.safetensors"
    checkpoints.save(path, net=net, ema=copy.deepcopy(net), meta=meta)
    return path


def test_shard_round_trip_and_spot_check(mf_teacher, tmp_path):
    teacher, meta = checkpoints.load(mf_teacher)
    spec = {**SPEC, "label_dropout": 0.5}
    gen = trajectories.Generator(teacher, meta, spec, torch.device("cpu"))
    made = gen.batch(list(range(5)))
    path = tmp_path / "shard-000000.tar"
    assert shards.write_shard(path, made, grid_name=gen.grid_name) == 5
    stored = shards.read_shard(path)
    for (i, states, grid, m), s in zip(made, stored, strict=True):
        assert s["index"] == i and s["meta"] == m and "sigmas" not in s
        np.testing.assert_array_equal(s["times"], grid)
        np.testing.assert_array_equal(s["states"], states)
        assert s["states"].shape == (9, 1, 8, 8)
    assert {s["meta"]["label"] for s in stored} <= {0, 1, 2, 3}
    assert trajectories.spot_check(3, [path], spec, mf_teacher) == 3

    # another label dropout (another spec): the classes differ, and the check names the shard
    with pytest.raises(ValueError, match="shard-000000.tar"):
        trajectories.spot_check(5, [path], {**SPEC, "label_dropout": 0.0}, mf_teacher)
    # states edited in place: refused
    edited = [(i, states + 0.5, grid, m) for i, states, grid, m in made]
    bad = tmp_path / "shard-000001.tar"
    shards.write_shard(bad, edited, grid_name="times")
    with pytest.raises(ValueError, match="differs from the one its seed gives"):
        trajectories.spot_check(1, [bad], spec, mf_teacher)
    # an EDM-teacher shard (sigmas) presented as flow-time: refused
    sig = tmp_path / "shard-000002.tar"
    shards.write_shard(sig, made, grid_name="sigmas")
    with pytest.raises(ValueError, match="stores no times"):
        trajectories.spot_check(1, [sig], spec, mf_teacher)


@pytest.mark.heavy
def test_stage_writes_times(mf_teacher, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "s.tar"
    subprocess.run([sys.executable, "-m", "stages.trajectory_shard", "--config", json.dumps({**SPEC, "per_shard": 2}),
                    "--threads", "1", "--teacher", str(mf_teacher), "--shard", "1", "--out", str(out)],
                   check=True, capture_output=True, cwd=repo)
    stored = shards.read_shard(out)
    assert [s["index"] for s in stored] == [2, 3]
    np.testing.assert_array_equal(stored[0]["times"], solvers.flow_time_grid(8).numpy())
