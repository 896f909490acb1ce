"""Power-function EMA and post-hoc reconstruction (EDM2, Karras et al. 2024, Section 3 and Appendix C;
stages/method/power_ema.py): the formulas against numerical integration, the tracked EMA against its
closed form on a synthetic trajectory, a third profile of a real run reconstructed from the other two,
snapshots bit for bit through a kill and a resume, and the config, checks, report and workflow around it.

The expected values are derived from the profile p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)
alone (scipy quadrature, or the geometric series of a plain EMA). As a cross-check, not used here,
NVlabs/edm2's training/phema.py (run 2026-12-06 from a scratch copy) gives std_to_exp(0.05, 0.10) =
16.9721986, 6.93720394, power_function_beta(0.05, t, 1) equal to (1 - 1/t)^(gamma + 1) for t = 1, 2, 3,
10, and solve_posthoc_coefficients over 20 snapshots of each profile (steps 75 .. 1500) for widths
0.02 and 0.07 at step 1500, and over 4 (steps 5 .. 20) for 0.05 and 0.2 at step 20, the coefficients
of power_ema.coefficients to within 3e-11 (both rescaled to sum to 1).
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import integrate
from stagekit import REPO, config, make_dataset, make_teacher, posttrain_config, run, run_in_process, state_args

from stages.config import power_ema, stage_configs, store_keys
from stages.config.checks import ConfigError
from stages.files import checkpoints
from stages.method import power_ema as formulas
from stages.training import resume
from stages.training.ema import EMA, PowerEMA

torch.set_num_threads(1)


def profile(t, gamma):
    return lambda tau: (gamma + 1) * tau**gamma / t ** (gamma + 1) if 0 <= tau <= t else 0.0


# ----------------------------------------------------------------------------------------------
# The formulas


def test_gamma_and_sigma_rel_invert_each_other_and_give_edm2s_exponents():
    # EDM2 tracks sigma_rel 0.05 and 0.10, gamma 16.97 and 6.94 (Section 3)
    assert formulas.gamma_of(0.05) == pytest.approx(16.97, abs=5e-3)
    assert formulas.gamma_of(0.10) == pytest.approx(6.94, abs=5e-3)
    for sigma_rel in (0.005, 0.02, 0.05, 0.1, 0.2, 0.28):
        gamma = formulas.gamma_of(sigma_rel)
        assert gamma > 0
        # the definition: sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1
        assert sigma_rel**2 * (gamma + 2) ** 2 * (gamma + 3) == pytest.approx(gamma + 1, rel=1e-12)
        assert formulas.sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # and the width is the profile's standard deviation over its age
    gamma, t = formulas.gamma_of(0.1), 3.0
    mean = integrate.quad(lambda tau: tau * profile(t, gamma)(tau), 0, t)[0]
    var = integrate.quad(lambda tau: (tau - mean) ** 2 * profile(t, gamma)(tau), 0, t)[0]
    assert math.sqrt(var) / t == pytest.approx(0.1, rel=1e-9)
    for bad in (0.0, 0.29, -0.1):
        with pytest.raises(ValueError, match="sigma_rel"):
            formulas.gamma_of(bad)


def test_update_weights_are_the_profile_over_each_step_and_sum_to_one():
    gamma, t = formulas.gamma_of(0.07), 9
    w = formulas.weights(t, gamma)
    exact = [integrate.quad(profile(t, gamma), i - 1, i)[0] for i in range(1, t + 1)]
    np.testing.assert_allclose(w, exact, rtol=1e-9, atol=1e-15)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert formulas.beta(1, gamma) == 0.0  # step 1 replaces the initial weights


def test_inner_product_and_fit_error_match_quadrature():
    pairs = [((10, 6.9), (10, 16.97)), ((4, 3.0), (10, 6.9)), ((1000, 11.2), (600, 2.5))]
    for (ta, ga), (tb, gb) in pairs:
        a, b = profile(ta, ga), profile(tb, gb)
        exact = integrate.quad(lambda tau, a=a, b=b: a(tau) * b(tau), 0, min(ta, tb), limit=200, epsabs=0)[0]
        assert formulas.inner_product(ta, ga, tb, gb) == pytest.approx(exact, rel=1e-8)
    stored = [(t, formulas.gamma_of(s)) for s in (0.05, 0.10) for t in (3, 6, 9, 12)]
    target = (12, formulas.gamma_of(0.07))
    x, error, mass = formulas.coefficients(stored, target)
    assert x.sum() == pytest.approx(1.0, abs=1e-12) and mass == pytest.approx(1.011, abs=1e-3)
    fit = lambda tau: sum(c * profile(*s)(tau) for c, s in zip(x, stored, strict=True))  # noqa: E731
    residual = integrate.quad(lambda tau: (fit(tau) - profile(*target)(tau)) ** 2, 0, 12, points=[3, 6, 9],
                              limit=200)[0]
    norm = integrate.quad(lambda tau: profile(*target)(tau) ** 2, 0, 12)[0]
    assert error == pytest.approx(math.sqrt(residual / norm), rel=1e-5)
    assert 0 < error < 0.05
    # a stored profile is its own snapshot
    x, error, mass = formulas.coefficients(stored, stored[5])
    np.testing.assert_allclose(x, np.eye(len(stored))[5], atol=1e-8)
    assert error < 1e-6 and mass == pytest.approx(1.0)
    # few snapshots fit a wide profile badly: the least-squares weights hold 0.91 of the weight, which
    # the rescaling makes 1; the error is the rescaled fit's
    few = [(t, formulas.gamma_of(s)) for s in (0.05, 0.10) for t in (5, 10, 15, 20)]
    x, error, mass = formulas.coefficients(few, (20, formulas.gamma_of(0.2)))
    assert mass == pytest.approx(0.91, abs=0.005) and x.sum() == pytest.approx(1.0, abs=1e-12)


def test_per_step_ema_width_matches_the_geometric_series_and_power_profiles_their_width():
    # ema <- beta ema + (1 - beta) theta for t >> 1 / (1 - beta): weights beta^(t - i) (1 - beta), a
    # geometric distribution of variance beta / (1 - beta)^2, and each step's piece adds 1/12
    beta, t = 0.99, 5000
    expected = math.sqrt(beta / (1 - beta) ** 2 + 1 / 12) / t
    assert EMA(torch.nn.Module(), beta).sigma_rel(t) == pytest.approx(expected, rel=1e-9)
    w0, w = EMA(torch.nn.Module(), beta).weights(t)
    assert w0 + w.sum() == pytest.approx(1.0, abs=1e-12) and w0 == pytest.approx(beta**t)
    # a power profile measured the same way has its own width (up to the steps' discreteness)
    gamma = formulas.gamma_of(0.08)
    assert formulas.profile_sigma_rel(0.0, formulas.weights(20000, gamma), 20000) == pytest.approx(0.08, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# Tracking


class Vector(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(n))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def test_tracked_power_ema_equals_its_closed_form_on_a_synthetic_trajectory():
    """theta_i a random walk with a drift; each profile after step t must be sum_i w_i theta_i with
    w_i = (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1); the per-step EMA beside them is untouched."""
    steps, sigma_rels = 200, [0.05, 0.10, 0.20]
    generator = torch.Generator().manual_seed(0)
    trajectory = torch.cumsum(0.1 + torch.randn(steps, 64, generator=generator, dtype=torch.float64), 0)
    net = Vector(64)
    ema = PowerEMA(net, 0.95, 0.1, sigma_rels, {})
    plain = EMA(net, 0.95, 0.1)
    for t in range(1, steps + 1):
        with torch.no_grad():
            net.theta.copy_(trajectory[t - 1])
            net.count.fill_(t)
        ema.update(net, t)
        plain.update(net, t)
        if t in (1, 2, 37, steps):
            for sigma_rel, tracked in zip(sigma_rels, ema.profiles, strict=True):
                w = torch.from_numpy(formulas.weights(t, formulas.gamma_of(sigma_rel)))
                expected = (w[:, None] * trajectory[:t]).sum(0)
                torch.testing.assert_close(tracked.theta.double(), expected, rtol=1e-5, atol=1e-4)
                assert tracked.count.item() == t  # buffers are the network's
    assert torch.equal(ema.module.theta, plain.module.theta)  # the model file's EMA is the plain one
    assert set(ema.averages()) == {"power_ema.0", "power_ema.1", "power_ema.2"}


def test_a_state_keeps_the_profiles_and_states_without_them_stay_readable(tmp_path):
    net = Vector(4)
    with torch.no_grad():
        net.theta.copy_(torch.arange(4.0))
    ema = PowerEMA(net, 0.9, None, [0.05, 0.1], {})
    for t in range(1, 4):
        with torch.no_grad():
            net.theta.add_(1.0)
        ema.update(net, t)
    opt = torch.optim.Adam(net.parameters())
    state = resume.TrainState(tmp_path / "power", stage="test", identity={})
    state.save(step=3, total_steps=9, batch=1, net=net, ema=ema.module, optimizer=opt, averages=ema.averages())
    fresh = PowerEMA(Vector(4), 0.9, None, [0.05, 0.1], {})
    resume.TrainState(tmp_path / "power", stage="test", identity={}).restore(
        net=Vector(4), ema=fresh.module, optimizer=torch.optim.Adam(Vector(4).parameters()), averages=fresh.averages())
    for a, b in zip(ema.profiles + [ema.module], fresh.profiles + [fresh.module], strict=True):
        assert torch.equal(a.theta, b.theta)
    # a state of a plain EMA (as every state before the power kind) restores as it did
    plain = resume.TrainState(tmp_path / "plain", stage="test", identity={})
    plain.save(step=3, total_steps=9, batch=1, net=net, ema=ema.module, optimizer=opt)
    back = EMA(Vector(4), 0.9)
    resume.TrainState(tmp_path / "plain", stage="test", identity={}).restore(
        net=Vector(4), ema=back.module, optimizer=torch.optim.Adam(Vector(4).parameters()))
    assert torch.equal(back.module.theta, ema.module.theta)
    # but it holds no profiles to give a power EMA
    with pytest.raises(ValueError, match="power_ema.0 tensors do not fit"):
        resume.TrainState(tmp_path / "plain", stage="test", identity={}).restore(
            net=Vector(4), ema=fresh.module, optimizer=torch.optim.Adam(Vector(4).parameters()),
            averages=fresh.averages())


# ----------------------------------------------------------------------------------------------
# A real post-training run: snapshots, reconstruction, resume


POWER = {"beta": 0.9, "rampup": 0.1, "kind": "power"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("power")
    return {"dir": d, "teacher": make_teacher(d / "teacher.safetensors"), "dataset": make_dataset(d / "data")}


def post_args(inputs, name, cfg, **checkpoint):
    run_dir = inputs["dir"] / name
    return ["--config", json.dumps(cfg), "--init", "teacher", "--init-model", inputs["teacher"],
            "--dataset", inputs["dataset"], "--out", run_dir / "model.safetensors", "--snapshots",
            run_dir / "snapshots", *state_args(run_dir / "state", **checkpoint)]


def distance(a, b):
    return math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a))


def test_a_third_profile_is_reconstructed_from_the_other_two(inputs):
    """60 steps tracking sigma_rel 0.05, 0.10 and 0.07, 20 snapshots each; from the 0.05 and 0.10
    snapshots alone the posthoc_ema stage synthesises 0.07 at the end. The profiles' relative L2 fit
    error is 0.25 % there (power_ema.coefficients), and the synthesis must lie within 1 % of the
    distance between the two stored profiles' weights from the tracked 0.07 (measured: 0.012 %; 1.8 %
    without rescaling the coefficients to sum to 1), which itself lies 32 % of that distance from the
    0.05 profile: no stored profile passes for it."""
    cfg = posttrain_config(steps=60, double_every=1000, ema={**POWER, "sigma_rels": [0.05, 0.10, 0.07]})
    run_in_process("stages.posttrain", post_args(inputs, "three", cfg))
    phema = inputs["dir"] / "three" / "phema"
    assert len(list(phema.glob("*.safetensors"))) == 3 * 20
    two = inputs["dir"] / "two"
    two.mkdir()
    for path in [*phema.glob("sigma_rel-0.0500-*"), *phema.glob("sigma_rel-0.1000-*")]:
        shutil.copy(path, two / path.name)
    out = inputs["dir"] / "posthoc"
    run_in_process("stages.posthoc_ema", ["--config", json.dumps({"sigma_rels": [0.05, 0.07], "at": 1.0}),
                                          "--phema", two, "--out-dir", out])
    end = "-step000000060.safetensors"
    low, high, held_out = (load_file(str(phema / f"sigma_rel-{s}{end}")) for s in ("0.0500", "0.1000", "0.0700"))
    synthesised = load_file(str(out / "sigma_rel-0.0700.safetensors"))
    spread = distance(low, high)
    assert distance(synthesised, held_out) < 0.01 * spread
    assert distance(low, held_out) > 0.2 * spread
    # a stored width comes back as its own snapshot
    assert distance(load_file(str(out / "sigma_rel-0.0500.safetensors")), low) < 1e-6 * spread
    meta = json.loads((out / "sigma_rel-0.0700.json").read_text())
    assert meta["steps"] == 60 and meta["role"] == "posthoc-ema"
    fit = meta["posthoc_ema"]
    assert fit["snapshots"] == 40 and fit["profiles"] == [0.05, 0.1] and fit["fit_error"] < 0.005
    # the run's own EMA: a ramp-up of 0.1 caps its half-life at a tenth of the steps done
    assert fit["per_step_sigma_rel"] == pytest.approx(EMA(torch.nn.Module(), 0.9, 0.1).sigma_rel(60))
    # the model file's EMA is the per-step EMA, as without the power kind
    model = load_file(str(inputs["dir"] / "three" / "model.safetensors"))
    assert all(not torch.equal(model[k], held_out[k]) for k in held_out if k.endswith("weight"))


def test_the_power_kind_changes_neither_the_trained_network_nor_the_model_files_ema(inputs):
    run_in_process("stages.posttrain", post_args(inputs, "plain", posttrain_config()))
    power = posttrain_config(ema={**POWER, "snapshot_every": 0.25})
    run_in_process("stages.posttrain", post_args(inputs, "power", power))
    for name in ("model.safetensors", "snapshots/p050.safetensors"):
        a, b = (load_file(str(inputs["dir"] / run_dir / name)) for run_dir in ("plain", "power"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not (inputs["dir"] / "plain" / "phema").exists()


def test_posthoc_refuses_a_point_without_a_snapshot(inputs, tmp_path):
    cfg = posttrain_config(steps=12, ema={**POWER, "snapshot_every": 0.5})
    run_in_process("stages.posttrain", post_args(inputs, "halves", cfg))
    with pytest.raises(ValueError, match=r"no power-EMA snapshot at step 4 \(the run kept steps \[6, 12\]\)"):
        run_in_process("stages.posthoc_ema", ["--config", json.dumps({"sigma_rels": [0.05], "at": 0.33}),
                                              "--phema", inputs["dir"] / "halves" / "phema", "--out-dir", tmp_path])


def test_a_run_killed_and_resumed_keeps_the_same_snapshots_bit_for_bit(inputs):
    """States every 3 steps, snapshots every 3 (0.25 of 12); the process dies while writing the state
    of step 9, after the snapshots of step 9: the resume from step 6 removes them and writes them again."""
    cfg = posttrain_config(ema={**POWER, "snapshot_every": 0.25})
    run_in_process("stages.posttrain", post_args(inputs, "straight", cfg, every_steps=3), keep_state=True)
    args = post_args(inputs, "killed", cfg, every_steps=3)
    state_dir = inputs["dir"] / "killed" / "state"
    first = run("stages.posttrain", args, faults=["--kill-while-saving", 9])
    assert first.returncode == -9, first.log
    assert sorted(p.name for p in state_dir.glob("step-*")) == ["step-000000006"]
    assert (state_dir / "phema" / "sigma_rel-0.0500-step000000009.safetensors").exists()
    run_in_process("stages.posttrain", args, keep_state=True)
    straight, resumed = inputs["dir"] / "straight" / "state" / "phema", state_dir / "phema"
    names = sorted(p.name for p in straight.iterdir())
    assert len(names) == 2 * 2 * 4 and names == sorted(p.name for p in resumed.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            a, b = load_file(str(straight / name)), load_file(str(resumed / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = load_file(str(inputs["dir"] / "straight" / "state" / "step-000000012" / "state.safetensors"))
    b = load_file(str(state_dir / "step-000000012" / "state.safetensors"))
    keys = [k for k in a if k.startswith("power_ema.")]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)


def test_a_teacher_with_power_profiles_writes_the_files_its_store_item_names(inputs, tmp_path):
    cfg = config(store=str(tmp_path / "store"), teacher={
        "steps": 4, "batch": 8, "ema": {"beta": 0.9, "kind": "power", "snapshot_every": 0.5}})
    item = store_keys.teacher(cfg)
    run_in_process("stages.train_teacher", ["--config", json.dumps(stage_configs.stage_config("train_teacher", cfg)),
                                            "--dataset", inputs["dataset"], "--key", item.key, "--out", item.path,
                                            *state_args(store_keys.teacher_state(cfg))])
    written = sorted(str(p) for p in Path(item.folder).rglob("*") if p.is_file())
    assert written == sorted(item.files) and len(item.files) == 2 + 2 * 2 * 2
    assert checkpoints.read_meta(item.files[2])["power_ema"]["sigma_rel"] == 0.05


@pytest.mark.heavy
def test_two_processes_keep_the_snapshots_of_one(inputs):
    """The global batch of 8 over 2 gloo processes (each rank's EMA updated alike, rank 0 writing)
    against 1 process: the same snapshots to float tolerance. Micro-batches of 4 make the parts of a
    step (and so their samples and dropout masks) the same: 1 process runs parts 0 and 1 in turn,
    2 processes one each."""
    import os
    import subprocess
    import sys

    cfg = posttrain_config(steps=6, batch_per_gpu=4, ema={**POWER, "snapshot_every": 0.5})
    common = ["--config", json.dumps(cfg), "--init", "teacher", "--init-model", inputs["teacher"],
              "--dataset", inputs["dataset"], "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def outputs(name):
        return ["--out", inputs["dir"] / name / "model.safetensors", "--snapshots", inputs["dir"] / name / "s"]

    two = subprocess.run([sys.executable, "-m", "stages.launch", "--gpus", "2", "stages.posttrain",
                          *map(str, common + outputs("p2"))],
                         env={**env, "SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": "0,1"}, capture_output=True,
                         text=True, timeout=300, cwd=inputs["dir"])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "stages.posttrain", *map(str, common + outputs("p1"))],
                         env=env, capture_output=True, text=True, timeout=300, cwd=inputs["dir"])
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    names = sorted(p.name for p in (inputs["dir"] / "p1" / "phema").glob("*.safetensors"))
    assert len(names) == 4 and names == sorted(p.name for p in (inputs["dir"] / "p2" / "phema").glob("*.safetensors"))
    teacher = load_file(str(inputs["teacher"]))
    for name in names:
        a = load_file(str(inputs["dir"] / "p2" / "phema" / name))
        b = load_file(str(inputs["dir"] / "p1" / "phema" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
        assert any(not torch.equal(a[k], teacher[k]) for k in a)  # trained, not the init


# ----------------------------------------------------------------------------------------------
# Config, checks, report


def test_the_power_kind_gets_its_defaults_and_other_sections_none():
    cfg = config(posttrain={"ema": {"beta": 0.9999, "kind": "power"}})
    assert cfg["posttrain"]["ema"] == {"beta": 0.9999, "rampup": 0.1, "kind": "power", "sigma_rels": [0.05, 0.10],
                                       "snapshot_every": 0.05}
    assert cfg["midtrain"]["ema"] == {"beta": 0.999, "rampup": 0.1}
    assert config()["posttrain"]["ema"] == {"beta": 0.9999, "rampup": 0.1}
    assert power_ema.snapshot_steps({"snapshot_every": 0.3}, 10) == [3, 6, 9, 10]
    assert power_ema.snapshot_steps(cfg["posttrain"]["ema"], 1500) == list(range(75, 1501, 75))
    assert power_ema.scored_inits(cfg) == ["cmt", "teacher", "random"]
    assert stage_configs.stage_config("posthoc_ema", cfg) == {"sigma_rels": [0.02, 0.03, 0.05, 0.07, 0.10, 0.13,
                                                                             0.17, 0.22], "at": 1.0}
    assert stage_configs.stage_config("sample", cfg, "posthoc-cmt") == cfg["sampling"]


def test_a_teacher_with_power_profiles_stores_its_snapshots_in_its_item():
    plain = store_keys.teacher(config())
    power = store_keys.teacher(config(teacher={"ema": {"beta": 0.999, "kind": "power", "snapshot_every": 0.5}}))
    assert plain.files == [f"{plain.folder}/model.safetensors", f"{plain.folder}/model.json"]
    assert power.key != plain.key
    assert power.files[2:] == [f"{power.folder}/phema/sigma_rel-{s}-step{t:09d}.{e}" for t in (1250, 2500)
                               for s in ("0.0500", "0.1000") for e in ("safetensors", "json")]


@pytest.mark.parametrize("changes, message", [
    ({"posttrain": {"ema": {"beta": 0.99, "kind": "power", "snapshot_every": 0.0001}}},
     "posttrain.ema.snapshot_every: 0.0001 of the 1500 steps of posttrain is less than a step"),
    ({"posttrain": {"ema": {"beta": 0.99, "kind": "power"}}, "posthoc_ema": {"at": 0.33}},
     "posthoc_ema.at: 0.33 of the 1500 steps of posttrain is step 495, where it keeps no snapshot"),
    ({"posttrain": {"ema": {"beta": 0.99, "kind": "power", "sigma_rels": [0.05, 0.05001]}}},
     "posttrain.ema.sigma_rels: [0.05, 0.05001] name the same profile twice"),
    ({"posttrain": {"inits": ["cmt", "baseline"], "ema": {"beta": 0.99, "kind": "power"}}},
     None),
    ({"posttrain": {"inits": ["cmt", "baseline"]}, "baseline": {"ema": {"beta": 0.99, "kind": "power"}}},
     "baseline.ema.kind: power for one of posttrain and baseline only"),
    ({"posthoc_ema": {"sigma_rels": [0.3]}}, "posthoc_ema.sigma_rels[0]"),
])
def test_power_ema_settings_that_cannot_work_are_refused_naming_the_key(changes, message):
    if message is None:
        config(**changes)
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        config(**changes)


def test_the_report_shows_fd_against_the_width_and_marks_the_best(tmp_path):
    from stages.reporting import figures, tables

    def entry(sigma_rel, one, two):
        return {"images_seen": 64, "1step": {"mean": one, "min": one}, "2step": {"mean": two, "min": two},
                "posthoc_ema": {"sigma_rel": sigma_rel, "step": 60, "snapshots": 40, "profiles": [0.05, 0.1],
                                "fit_error": 0.01, "mass": 1.0, "per_step_sigma_rel": 0.111}}

    posthoc = {"cmt": {"snapshots": {"sigma_rel-0.0200": entry(0.02, 3.0, 2.0),
                                     "sigma_rel-0.0700": entry(0.07, 1.5, 2.5),
                                     "sigma_rel-0.1300": entry(0.13, 2.0, 1.0)}}}
    own = {"cmt": {"1step": {"mean": 1.8}, "2step": {"mean": 1.1}}}
    lines = tables.posthoc_ema(posthoc, own, [1, 2], {"cmt": "CMT init"})
    assert "| CMT init | 60 | 1-step | 3.000 | **1.500** | 2.000 | 0.07 | 1.800 at 0.111 |" in lines
    assert "| CMT init | 60 | 2-step | 2.000 | 2.500 | **1.000** | 0.13 | 1.100 at 0.111 |" in lines
    assert "- CMT init: 40 snapshots of the profiles 0.05, 0.1; 0.02: 1.0e-02 (1.0000), 0.07: 1.0e-02 (1.0000), " \
           "0.13: 1.0e-02 (1.0000)." in lines
    assert "- CMT init, 1-step: the best width 0.07 gives 1.500; the run's own EMA (width 0.111) 1.800, " \
           "+20.0 % against the best." in lines
    figures.fd_sigma_rel(tmp_path / "curve.png", posthoc, own, [1, 2], {"cmt": "CMT init"}, "row")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_the_workflow_plans_the_syntheses_their_samples_and_scores(tmp_path):
    from workflow_runs import planned_jobs, snakemake

    variant = REPO / "config" / "rows" / "variants" / "digits-cmt-ect-posthoc-ema.yaml"
    jobs = planned_jobs(snakemake(tmp_path, "-n", configs=[variant]))
    widths = len(config()["posthoc_ema"]["sigma_rels"])
    # a synthesis per post-training init and the mid-trained model, each width sampled and scored
    assert jobs["posthoc_ema"] == 4 and jobs["fid"] == 4 + 4
    assert jobs["sample"] == 3 * 5 + 1 + 4 * widths
    # without the power kind the row plans what it always did
    plain = planned_jobs(snakemake(tmp_path, "-n", configs=[REPO / "config" / "rows" / "digits-cmt-ect.yaml"]))
    assert "posthoc_ema" not in plain and plain["sample"] == 3 * 5 + 1


@pytest.mark.heavy
def test_the_tiny_row_with_power_emas_end_to_end_and_a_new_width_trains_nothing(tmp_path):
    """Through Snakemake: every run keeps 2 profiles x 4 snapshots, each init's syntheses are
    sampled and scored and the report shows them; asking for other widths reruns no training."""
    import yaml
    from workflow_runs import TINY, planned_jobs, snakemake

    configs = [TINY, REPO / "tests" / "tiny-phema.yaml"]
    result = snakemake(tmp_path, configs=configs)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    res = tmp_path / "results" / "tiny-phema"
    for run_dir in (res / "midtrain", res / "posttrain" / "cmt", res / "posttrain" / "random"):
        assert len(list((run_dir / "phema").glob("*.safetensors"))) == 2 * 4, run_dir
    assert not (res / "state").exists() or not list((res / "state").rglob("*.safetensors"))
    fid = json.loads((res / "fid" / "posthoc-cmt.json").read_text())
    assert sorted(fid["snapshots"]) == ["sigma_rel-0.0500", "sigma_rel-0.1000", "sigma_rel-0.2000"]
    assert fid["snapshots"]["sigma_rel-0.1000"]["posthoc_ema"]["snapshots"] == 8
    report = (res / "report.md").read_text()
    assert "Post-hoc EMA (EDM2's power-function profiles)" in report and "| mid-trained model alone | 20 |" in report
    assert "fd_sigma_rel.png" in report and (res / "fd_sigma_rel.png").read_bytes()[:4] == b"\x89PNG"
    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump({"posthoc_ema": {"sigma_rels": [0.05, 0.15]}}))
    jobs = planned_jobs(snakemake(tmp_path, "-n", configs=[*configs, wider]))
    assert jobs.pop("posthoc_ema") == 4 and set(jobs) <= {"sample", "fid", "report", "all"}, jobs
