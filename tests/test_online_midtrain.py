"""Online mid-training (midtrain.trajectories = online, the official code's design): the teacher
solves each step's trajectories inside the step. It must train on exactly the trajectories an
offline pool of the same spec stores under the same indices, with the same loss and gradients, and
resume bit for bit (its data is a function of the step)."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from stagekit import NFE, assert_same_tensors, make_teacher, midtrain_config, run_in_process, state_args

from stages.data import shards
from stages.files import checkpoints
from stages.method import losses, trajectories
from stages.training import resume

torch.set_num_threads(1)

N = 6
SPEC = {"solver": "dpm_solver_pp", "order": 3, "lower_order_final": True, "nfe": NFE, "x_T": "noise",
        "seed": 3, "per_shard": 8, "batch": 8, "dtype": "float32", "sigma_max": 80.0, "sigma_min": 0.002,
        "teacher_key": "test", "code": 1}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = make_teacher(tmp_path_factory.mktemp("online") / "teacher.safetensors")
    net, meta = checkpoints.load(path, which="ema")
    with torch.no_grad():  # a denoiser that is not the identity: the zero-initialised output perturbed
        net.model.conv_out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    checkpoints.save(path, net=net, ema=copy.deepcopy(net), meta={k: v for k, v in meta.items() if k != "sha256"})
    return path


def generator(teacher):
    net, meta = checkpoints.load(teacher, which="ema")
    return trajectories.Generator(net, meta, SPEC, torch.device("cpu"))


def test_step_indices_fold_step_and_rank_and_cover_each_trajectory_once(teacher):
    gen = generator(teacher)
    one = trajectories.OnlineTrajectories(gen, 4)
    ranks = [trajectories.OnlineTrajectories(gen, 4, rank, 2) for rank in range(2)]
    assert one.indices(3) == [12, 13, 14, 15]
    assert ranks[0].indices(3) + ranks[1].indices(3) == one.indices(3)  # the global step, split
    with pytest.raises(ValueError, match="cannot be split over 3 processes"):
        trajectories.OnlineTrajectories(gen, 4, 0, 3)
    # micro-batches as loop.fit numbers them: part = rank x micro-batches + micro, over the global
    # step (2 ranks x 2 micro-batches of 1 trajectory); each rank's parts are its share
    starts = {part: ranks[part // 2].batch(3, part, 1)[0][:, 0] for part in range(4)}
    for part, index in zip(range(4), one.indices(3), strict=True):
        torch.testing.assert_close(starts[part][0], gen.start_point(index)[0], rtol=0, atol=0)
    assert [i for part in (2, 3) for i in [one.indices(3)[part]]] == ranks[1].indices(3)
    with pytest.raises(ValueError, match="beyond the step"):
        one.batch(3, 4, 1)


def test_online_gradients_equal_the_offline_ones_on_the_same_trajectories(teacher, tmp_path):
    """Step 2's trajectories solved inside the step vs the same indices written to a float32 shard
    by the trajectory stage's code and read back as the offline reader does: same states, loss and
    gradient of every parameter."""
    gen = generator(teacher)
    online = trajectories.OnlineTrajectories(gen, 2)
    step = 2
    states_on, sigmas_on, _ = online.batch(step)
    assert states_on.dtype == torch.float32 and states_on.shape == (2, NFE + 1, 1, 8, 8)

    path = tmp_path / "shard.tar"
    shards.write_shard(path, gen.batch(online.indices(step)))
    stored = sorted(shards.read_shard(path), key=lambda s: s["index"])
    assert [s["index"] for s in stored] == online.indices(step)
    states_off = torch.from_numpy(np.stack([s["states"] for s in stored]).astype(np.float32))
    sigmas_off = torch.from_numpy(stored[0]["sigmas"].astype(np.float32))
    torch.testing.assert_close(states_on, states_off, rtol=0, atol=0)
    torch.testing.assert_close(sigmas_on, sigmas_off, rtol=0, atol=0)
    # the trajectory is the teacher's: its first state is the start point of its index
    torch.testing.assert_close(states_on[0, 0], gen.start_point(online.indices(step)[0])[0])

    student, _ = checkpoints.load(teacher, which="ema", kind="ecm", sigma_boundary=0.002)
    distance = losses.make_distance("l2")
    grads = []
    for states, sigmas in ((states_on, sigmas_on), (states_off, sigmas_off)):
        student.zero_grad(set_to_none=True)
        loss = losses.cmt_cm_loss(student, states, sigmas, distance).mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    assert grads[0][0] > 0 and torch.equal(grads[0][0], grads[1][0])
    assert any(g.abs().sum() > 0 for g in grads[0][1])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.equal(a, b)


def online_args(teacher, folder, **checkpoint):
    cfg = midtrain_config(steps=N, trajectories="online")
    cfg["trajectory_spec"] = SPEC
    return ["--config", json.dumps(cfg), "--teacher", teacher, "--out", folder / "model.safetensors",
            *state_args(folder / "state", **checkpoint)]


def test_online_midtrain_runs_without_shards_and_a_sliced_run_is_bit_exact(teacher, tmp_path):
    run_in_process("stages.midtrain", online_args(teacher, tmp_path / "straight"))
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    meta = checkpoints.read_meta(tmp_path / "straight" / "model.safetensors")
    assert meta["inputs"]["trajectories"] == "online" and "manifest" not in meta["inputs"]
    assert meta["trajectories_seen"] == N * 2
    init = load_file(str(teacher))
    assert not torch.equal(straight["net.model.conv_out.weight"], init["ema.model.conv_out.weight"])

    args = online_args(teacher, tmp_path / "sliced", slice_kimg=N // 2 * 2 * NFE / 1000)
    with pytest.raises(SystemExit) as stop:
        run_in_process("stages.midtrain", args)
    assert stop.value.code == resume.EXIT_SLICE
    run_in_process("stages.midtrain", args)
    assert_same_tensors(load_file(str(tmp_path / "sliced" / "model.safetensors")), straight,
                        prefixes=("net.", "ema."))
