"""Auto-resume through the real stages: bit-exact after a SIGKILL, signals, slices, config changes.

The kills are real: tests/run_stage.py makes a stage process SIGKILL or signal itself at a chosen
step, so nothing in it gets to clean up. The uninterrupted runs and the resumes run in this process
(a stage is deterministic across processes on CPU with one thread), keeping their final state.
"""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from stagekit import (
    assert_same_tensors,
    load_state,
    make_dataset,
    make_teacher,
    make_trajectories,
    midtrain_config,
    posttrain_config,
    run,
    run_in_process,
    state_args,
)

from stages.files import checkpoints
from stages.training import resume

torch.set_num_threads(1)

N = 12  # steps of every run here; the kills fall at N / 2
SIGKILLED = -signal.SIGKILL


def model_jobs(run_dir):
    """The jobs a run's model file records (stages/training/job_log.py)."""
    return checkpoints.read_meta(run_dir / "model.safetensors")["jobs"]


# ----------------------------------------------------------------------------------------------
# Mid-training


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    d = tmp_path_factory.mktemp("midtrain")
    return {"dir": d, "teacher": make_teacher(d / "teacher.safetensors"),
            "manifest": make_trajectories(d / "trajectories")}


def mid_args(mid, name, cfg=None, **checkpoint):
    run_dir = mid["dir"] / name
    return ["--config", json.dumps(cfg or midtrain_config()), "--teacher", mid["teacher"],
            "--manifest", mid["manifest"], "--out", run_dir / "model.safetensors",
            *state_args(run_dir / "state", **checkpoint)]


@pytest.fixture(scope="module")
def mid_straight(mid):
    """N steps in one go, and the state saved after the last one."""
    run_in_process("stages.midtrain", mid_args(mid, "straight", every_steps=N // 2), keep_state=True)
    return load_state(mid["dir"] / "straight" / "state" / f"step-{N:09d}")


def test_midtrain_sigkill_and_resume_is_bit_exact(mid, mid_straight, capsys):
    args = mid_args(mid, "killed", every_steps=N // 2)
    state_dir = mid["dir"] / "killed" / "state"
    first = run("stages.midtrain", args, faults=["--kill-after-save", N // 2])
    assert first.returncode == SIGKILLED, first.log
    assert sorted(p.name for p in state_dir.glob("step-*")) == [f"step-{N // 2:09d}"]
    _, info = load_state(state_dir / f"step-{N // 2:09d}")
    # 6 steps x 2 trajectories = 12 of a 10-trajectory pool: the state is 2 into the second epoch
    assert info["step"] == N // 2 and info["data"] == {"epoch": 1, "offset": 2}

    capsys.readouterr()
    run_in_process("stages.midtrain", args, keep_state=True)
    assert f"resumed from {state_dir / f'step-{N // 2:09d}'} at step {N // 2}/{N}" in capsys.readouterr().out
    assert (mid["dir"] / "killed" / "model.safetensors").exists()
    tensors, info = load_state(state_dir / f"step-{N:09d}")
    straight_tensors, straight_info = mid_straight
    assert_same_tensors(tensors, straight_tensors)  # network, EMA and optimizer, bit for bit
    assert info["data"] == straight_info["data"] == {"epoch": 2, "offset": 4}
    assert straight_tensors["optimizer.0.step"].item() == N
    # the killed job recorded itself up to its save at N/2 (the state of N/2 holds it); the resume
    # trains from there
    jobs = model_jobs(mid["dir"] / "killed")
    assert [(j["steps"], j["ended"]) for j in jobs] == [([0, N // 2], "lost"), ([N // 2, N], "finished")]


def test_midtrain_slice_stops_with_its_code_and_the_rerun_finishes(mid, mid_straight):
    args = mid_args(mid, "sliced", slice_kimg=N // 2 * 8 / 1000)  # N/2 steps of 8 images per job
    with pytest.raises(SystemExit) as stop:
        run_in_process("stages.midtrain", args)
    assert stop.value.code == resume.EXIT_SLICE
    state_dir = mid["dir"] / "sliced" / "state"
    assert sorted(p.name for p in state_dir.glob("step-*")) == [f"step-{N // 2:09d}"]
    assert not (mid["dir"] / "sliced" / "model.safetensors").exists()

    first_jobs = load_state(state_dir / f"step-{N // 2:09d}")[1]["jobs"]
    assert [(j["steps"], j["ended"]) for j in first_jobs] == [([0, N // 2], "slice")]

    run_in_process("stages.midtrain", args)
    final = load_file(str(mid["dir"] / "sliced" / "model.safetensors"))
    assert_same_tensors(final, mid_straight[0], prefixes=("net.", "ema."))
    assert not state_dir.exists()  # the outputs are written: the state is gone
    # both jobs in the model file, one after the other without a gap, each with its own wall time
    jobs = model_jobs(mid["dir"] / "sliced")
    assert [(j["steps"], j["ended"]) for j in jobs] == [([0, N // 2], "slice"), ([N // 2, N], "finished")]
    assert jobs[0] == first_jobs[0]
    assert all(j["wall_seconds"] > 0 for j in jobs)
    # the run's training time is in the jobs' wall time, which also holds each job's setup
    assert sum(j["wall_seconds"] for j in jobs) > checkpoints.read_meta(mid["dir"] / "sliced" / "model.safetensors")[
        "train_seconds"]
    assert [(j["steps"], j["ended"]) for j in model_jobs(mid["dir"] / "straight")] == [([0, N], "finished")]


def test_midtrain_ctrl_c_saves_and_exits_and_the_rerun_is_bit_exact(mid, mid_straight, capsys):
    """Ctrl-C sends SIGINT to Snakemake's process group: the stage saves like on SIGTERM, no
    KeyboardInterrupt losing the steps since the last save."""
    args = mid_args(mid, "interrupted")
    state_dir = mid["dir"] / "interrupted" / "state"
    first = run("stages.midtrain", args, faults=["--signal-at", "3:SIGINT"])
    assert first.returncode == 128 + signal.SIGINT, first.log
    assert "received SIGINT" in first.log and "state saved at step 4/12" in first.log
    assert "KeyboardInterrupt" not in first.log
    assert sorted(p.name for p in state_dir.glob("step-*")) == ["step-000000004"]

    capsys.readouterr()
    run_in_process("stages.midtrain", args, keep_state=True)
    assert f"resumed from {state_dir / 'step-000000004'} at step 4/12" in capsys.readouterr().out
    tensors, info = load_state(state_dir / f"step-{N:09d}")
    assert_same_tensors(tensors, mid_straight[0])
    assert info["data"] == mid_straight[1]["data"]
    jobs = model_jobs(mid["dir"] / "interrupted")
    assert [(j["steps"], j["ended"], j.get("signal")) for j in jobs] == [
        ([0, 4], "signal", "SIGINT"), ([4, N], "finished", None)]


# ----------------------------------------------------------------------------------------------
# Post-training


@pytest.fixture(scope="module")
def post(tmp_path_factory):
    d = tmp_path_factory.mktemp("posttrain")
    return {"dir": d, "teacher": make_teacher(d / "teacher.safetensors"), "dataset": make_dataset(d / "data")}


def post_args(post, name, cfg=None, **checkpoint):
    run_dir = post["dir"] / name
    return ["--config", json.dumps(cfg or posttrain_config()), "--init", "teacher",
            "--init-model", post["teacher"], "--dataset", post["dataset"],
            "--out", run_dir / "model.safetensors", "--snapshots", run_dir / "snapshots",
            *state_args(run_dir / "state", **checkpoint)]


@pytest.fixture(scope="module")
def post_straight(post):
    run_in_process("stages.posttrain", post_args(post, "straight", every_steps=N // 2), keep_state=True)
    state_dir = post["dir"] / "straight" / "state"
    snapshots = {p.stem: load_file(str(p)) for p in (state_dir / "snapshots").glob("*.safetensors")}
    assert sorted(snapshots) == ["p000", "p050", "p100"]
    return load_state(state_dir / f"step-{N:09d}"), snapshots


def test_posttrain_killed_while_saving_resumes_from_the_previous_state_bit_exact(post, post_straight, capsys):
    """Saves every N/4 steps; the process dies halfway through writing the state of step 3N/4, so
    the state of step N/2 is the newest complete one, and the resume runs the last N/2 steps."""
    args = post_args(post, "killed", every_steps=N // 4)
    state_dir = post["dir"] / "killed" / "state"
    first = run("stages.posttrain", args, faults=["--kill-while-saving", 3 * N // 4])
    assert first.returncode == SIGKILLED, first.log
    partial = list(state_dir.glob(".tmp-*/state.safetensors"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # a half-written file was left behind
    assert sorted(p.name for p in state_dir.glob("step-*")) == [f"step-{N // 2:09d}"]

    capsys.readouterr()
    run_in_process("stages.posttrain", args, keep_state=True)
    assert f"at step {N // 2}/{N}" in capsys.readouterr().out
    assert not list(state_dir.glob(".tmp-*"))
    tensors, info = load_state(state_dir / f"step-{N:09d}")
    (straight_tensors, _), straight_snapshots = post_straight
    assert_same_tensors(tensors, straight_tensors)
    for name, snap in straight_snapshots.items():
        assert_same_tensors(load_file(str(state_dir / "snapshots" / f"{name}.safetensors")), snap, prefixes=("ema.",))


def test_posttrain_sigterm_saves_and_exits_then_a_changed_config_is_refused_and_a_rerun_completes(
        post, post_straight, capsys):
    args = post_args(post, "term")
    run_dir, state_dir = post["dir"] / "term", post["dir"] / "term" / "state"
    first = run("stages.posttrain", args, faults=["--signal-at", "3:SIGTERM"])
    assert first.returncode == 128 + signal.SIGTERM, first.log
    assert "received SIGTERM" in first.log and "state saved at step 4/12" in first.log
    assert sorted(p.name for p in state_dir.glob("step-*")) == ["step-000000004"]
    assert not (run_dir / "model.safetensors").exists()

    changed = posttrain_config(q=8, optimizer={"name": "adam", "lr": 2e-3})
    with pytest.raises(ValueError) as err:
        run_in_process("stages.posttrain", post_args(post, "term", cfg=changed))
    message = str(err.value)
    assert "config.posttrain.q: 4 in the state, 8 now" in message
    assert "config.posttrain.optimizer.lr: 0.001 in the state, 0.002 now" in message
    assert f"delete {state_dir}" in message and "config.posttrain.steps" not in message

    capsys.readouterr()
    run_in_process("stages.posttrain", args)
    assert f"resumed from {state_dir / 'step-000000004'} at step 4/12" in capsys.readouterr().out
    (straight_tensors, _), straight_snapshots = post_straight
    assert_same_tensors(load_file(str(run_dir / "model.safetensors")), straight_tensors, prefixes=("net.", "ema."))
    for name, snap in straight_snapshots.items():  # the snapshots made before the signal survived
        assert_same_tensors(load_file(str(run_dir / "snapshots" / f"{name}.safetensors")), snap, prefixes=("ema.",))
    assert not state_dir.exists()


# ----------------------------------------------------------------------------------------------
# MeanFlow post-training (the MeanFlow stages share fit() and its state)


def test_posttrain_meanflow_sigkill_and_resume_is_bit_exact(tmp_path):
    from stagekit import config

    teacher = make_teacher(tmp_path / "teacher.safetensors")
    dataset = make_dataset(tmp_path / "data")
    cfg = config(posttrain_mf={"steps": 8, "batch": 8, "snapshots": [0, 0.5, 1.0],
                               "optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.95]},
                               "ema": {"beta": 0.9}})
    stage_cfg = {"seed": 0, "steps": 8, "posttrain_mf": {k: v for k, v in cfg["posttrain_mf"].items() if k != "inits"}}

    def args(name):
        run_dir = tmp_path / name
        return ["--config", json.dumps(stage_cfg), "--init", "random", "--init-model", teacher,
                "--dataset", dataset, "--out", run_dir / "model.safetensors", "--snapshots",
                run_dir / "snapshots", *state_args(run_dir / "state", every_steps=4)]

    run_in_process("stages.posttrain_mf", args("straight"), keep_state=True)
    first = run("stages.posttrain_mf", args("killed"), faults=["--kill-after-save", 4])
    assert first.returncode == SIGKILLED, first.log
    run_in_process("stages.posttrain_mf", args("killed"), keep_state=True)
    straight, _ = load_state(tmp_path / "straight" / "state" / f"step-{8:09d}")
    resumed, _ = load_state(tmp_path / "killed" / "state" / f"step-{8:09d}")
    assert_same_tensors(resumed, straight)
    for name in ("p000", "p050", "p100"):
        a = load_file(str(tmp_path / "straight" / "snapshots" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "killed" / "snapshots" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
