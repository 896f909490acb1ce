"""The MeanFlow teacher stage (train_teacher with teacher.objective meanflow) and the class-conditional
CMT-MF chain after it, on a tiny class-conditional DiT and the digits' 10 classes: the teacher trains
(label dropout and guidance in the target) and resumes bit-exactly after a SIGKILL; its flow-time
trajectories go through the manifest into midtrain_mf (the row's own student network, labels per
trajectory), and MeanFlow post-training continues from the mid-trained model with labels."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from stagekit import assert_same_tensors, config, load_state, make_dataset, run, run_in_process, state_args

from stages.config import stage_configs
from stages.data import shards
from stages.files import atomic, checkpoints
from stages.method import trajectories

TEACHER_NET = {"kind": "dit", "depth": 1, "hidden_size": 32, "patch_size": 4, "num_heads": 2, "num_classes": 10}
STUDENT_NET = {"kind": "dit", "depth": 2, "hidden_size": 32, "patch_size": 2, "num_heads": 2, "num_classes": 10}
SIGKILLED = -signal.SIGKILL
MEANFLOW = {"label_dropout": 0.1, "guidance": {"omega": 1.0, "kappa": 0.5, "t_max": 0.75}}


def row(**overrides):
    """A class-conditional MeanFlow row of the digits: DiT teacher and student, flow-time trajectories."""
    return config(**{"family": "mf", "network": STUDENT_NET,
                     "trajectories": {"solver": "meanflow", "label_dropout": 0.1},
                     "teacher": {"objective": "meanflow", "network": TEACHER_NET, "meanflow": MEANFLOW, "steps": 6,
                                 "batch": 8, "dropout": 0.0, "ema": {"beta": 0.9},
                                 "optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.95]}},
                     "midtrain_mf": {"steps": 4, "batch": 16, "pairs_per_trajectory": 8, "shuffle_buffer": 2,
                                     "optimizer": {"name": "adam", "lr": 1e-3}, "ema": {"beta": 0.9}},
                     "posttrain_mf": {"steps": 2, "batch": 4, "snapshots": [1.0], **MEANFLOW,
                                      "equal_total_budget": False, "optimizer": {"name": "adam", "lr": 1e-4},
                                      "ema": {"beta": 0.9}},
                     **overrides})


def teacher_config():
    return stage_configs.stage_config("train_teacher", row())


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("digits"))


def teacher_args(folder, dataset, cfg):
    return ["--config", json.dumps(cfg), "--dataset", dataset, "--key", "k-mf-teacher",
            "--out", folder / "model.safetensors", *state_args(folder / "state", every_steps=3)]


def test_meanflow_teacher_trains_and_resumes_bit_exactly(digits, tmp_path):
    cfg = teacher_config()
    run_in_process("stages.train_teacher", teacher_args(tmp_path / "straight", digits, cfg), keep_state=True)
    first = run("stages.train_teacher", teacher_args(tmp_path / "killed", digits, cfg), faults=["--kill-after-save", 3])
    assert first.returncode == SIGKILLED, first.log
    run_in_process("stages.train_teacher", teacher_args(tmp_path / "killed", digits, cfg), keep_state=True)
    straight, _ = load_state(tmp_path / "straight" / "state" / f"step-{6:09d}")
    resumed, _ = load_state(tmp_path / "killed" / "state" / f"step-{6:09d}")
    assert_same_tensors(resumed, straight)


@pytest.fixture(scope="module")
def mf_teacher(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mf-teacher")
    run_in_process("stages.train_teacher", teacher_args(folder, digits, teacher_config()))
    return folder / "model.safetensors"


def test_teacher_model_file(mf_teacher):
    meta = checkpoints.read_meta(mf_teacher)
    assert meta["precond"] == "meanflow" and meta["time"] == "flow_t" and meta["objective"] == "meanflow"
    assert meta["architecture"] == {**TEACHER_NET, "in_channels": 1, "resolution": 8, "dropout": 0.0,
                                    "dual_time": True}
    assert meta["key"] == "k-mf-teacher" and meta["images_seen"] == 6 * 8
    net, _ = checkpoints.load(mf_teacher)
    assert net.num_classes == 10 and net.null_class == 10
    # trained: the zero-initialised output layer has moved, so u is no longer zero
    weights = load_file(str(mf_teacher))
    assert weights["ema.model.final_layer.linear.weight"].abs().max() > 0


def test_flow_time_trajectories_feed_class_conditional_cmt_mf_then_meanflow(mf_teacher, digits, tmp_path):
    teacher, meta = checkpoints.load(mf_teacher)
    spec = {"solver": "meanflow", "nfe": 8, "x_T": "noise", "seed": 1, "per_shard": 4, "batch": 4,
            "dtype": "float16", "label_dropout": 0.1, "sigma_max": 80.0, "sigma_min": 0.002,
            "teacher_key": "k-mf-teacher", "code": 1}
    gen = trajectories.Generator(teacher, meta, spec, torch.device("cpu"))
    entries = []
    for k in range(2):
        path = tmp_path / f"shard-{k:06d}.tar"
        shards.write_shard(path, gen.batch(list(range(4 * k, 4 * k + 4))), grid_name="times")
        entries.append({"path": str(path), "count": 4, "bytes": path.stat().st_size,
                        "sha256": atomic.sha256_file(path), "receipt": str(tmp_path / f"r{k}.json")})
    manifest = tmp_path / "manifest.json"
    atomic.write_json(manifest, {"spec": spec, "teacher": {"path": str(mf_teacher), "sha256": meta["sha256"]},
                                 "total": 8, "shards": entries})
    cfg = row()
    mid_out = tmp_path / "mid" / "model.safetensors"
    run_in_process("stages.midtrain_mf", [
        "--config", json.dumps(stage_configs.stage_config("midtrain_mf", cfg)),
        "--teacher", mf_teacher, "--manifest", manifest, "--spot-check", 2, "--out", mid_out])
    mid = checkpoints.read_meta(mid_out)
    assert mid["architecture"] == {**STUDENT_NET, "in_channels": 1, "resolution": 8, "dropout": 0.0, "dual_time": True}
    assert mid["trajectories_seen"] == 4 * 2
    assert mid["time_convention"]["trajectories"] == "flow time (MeanFlow teacher)"
    run_in_process("stages.posttrain_mf", [
        "--config", json.dumps(stage_configs.stage_config("posttrain_mf", cfg, "cmt")),
        "--init", "cmt", "--init-model", mid_out, "--dataset", digits, "--out", tmp_path / "post" / "model.safetensors",
        "--snapshots", tmp_path / "post" / "snapshots"])
    out = checkpoints.read_meta(tmp_path / "post" / "model.safetensors")
    assert out["architecture"] == mid["architecture"] and out["images_seen_total"] == mid["images_seen"] + 2 * 4

    # the random init (MeanFlow from scratch) takes the row's network, not the teacher's
    run_in_process("stages.posttrain_mf", [
        "--config", json.dumps(stage_configs.stage_config("posttrain_mf", cfg, "random")),
        "--init", "random", "--init-model", mf_teacher, "--dataset", digits,
        "--out", tmp_path / "rand" / "model.safetensors", "--snapshots", tmp_path / "rand" / "snapshots"])
    assert checkpoints.read_meta(tmp_path / "rand" / "model.safetensors")["architecture"] == mid["architecture"]


def test_an_edm_teacher_with_flow_time_trajectories_is_refused(tmp_path, mf_teacher):
    from stagekit import make_teacher

    edm = make_teacher(tmp_path / "edm.safetensors")
    with pytest.raises(ValueError, match="MeanFlow teacher"):
        trajectories.Generator(*checkpoints.load(edm), {"solver": "meanflow", "nfe": 2, "x_T": "noise", "seed": 0,
                                                       "dtype": "float16"}, torch.device("cpu"))


def test_objective_from_config_refuses_labels_on_an_unconditional_network_and_guidance_without_dropout():
    from stages.method import meanflow

    section = {"P_mean": -0.4, "P_std": 1.0, "ratio_r_neq_t": 0.25, "adaptive_p": 1.0, "adaptive_c": 1e-3}
    unconditional = checkpoints.build({"architecture": {**TEACHER_NET, "num_classes": 0, "in_channels": 1,
                                                                "resolution": 8, "dropout": 0.0},
                                               "precond": "meanflow", "sigma_data": 0.5, "sigma_min": 0.002})
    with pytest.raises(ValueError, match="unconditional"):
        meanflow.Objective.from_config({**section, "label_dropout": 0.1}, unconditional, "posttrain_mf")
    plain = meanflow.Objective.from_config(section, unconditional, "posttrain_mf")
    assert plain.null_class is None and plain.guidance is None
    conditional = checkpoints.build({"architecture": {**TEACHER_NET, "in_channels": 1, "resolution": 8,
                                                              "dropout": 0.0},
                                             "precond": "meanflow", "sigma_data": 0.5, "sigma_min": 0.002})
    with pytest.raises(ValueError, match="needs label_dropout"):
        meanflow.Objective.from_config({**section, "guidance": {"omega": 1.0}}, conditional, "posttrain_mf")
    full = meanflow.Objective.from_config({**section, **MEANFLOW}, conditional, "teacher.meanflow")
    assert full.null_class == 10 and full.guidance.effective_scale == pytest.approx(2.0)
    with pytest.raises(ValueError, match="needs the data's labels"):
        full.loss(conditional, torch.zeros(2, 1, 8, 8), torch.Generator().manual_seed(0))
