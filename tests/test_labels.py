"""Class labels end to end: a class-conditional tiny EDM2 (its output depends on the label) gets the
dataset's class or a seeded uniform class in trajectories, the trajectory's class at mid-training,
the batch's classes at post-training and a seeded uniform class at sampling; the shards and the
samples file record them; unconditional networks take none (their files hold no label: the
trajectory and pipeline tests)."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.data import datasets, labels, shards
from stages.files import atomic, checkpoints
from stages.method import losses, trajectories
from tests.stagekit import make_dataset, midtrain_config, posttrain_config, run_in_process
from tests.tiny_edm2 import CLASSES, conditional_net
from tests.tiny_edm2 import CONDITIONAL as ARCH

SPEC = {"solver": "dpm_solver_pp", "order": 2, "lower_order_final": True, "nfe": 4, "x_T": "noise",
        "seed": 7, "per_shard": 4, "batch": 2, "dtype": "float32", "sigma_max": 80.0, "sigma_min": 0.002,
        "teacher_key": "k-cond", "code": 1}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    net = conditional_net()
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    checkpoints.save(path, net=net, ema=copy.deepcopy(net), meta={
        "role": "teacher", "key": "k-cond", "architecture": ARCH, "precond": "edm", "sigma_data": 0.5,
        "sigma_min": 0.002, "sigma_max": 80.0, "time": "sigma"})
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_random_label_is_a_pure_uniform_function_of_seed_and_index():
    draws = [labels.random_label(3, i, CLASSES) for i in range(2000)]
    assert draws == [labels.random_label(3, i, CLASSES) for i in range(2000)]
    assert draws != [labels.random_label(4, i, CLASSES) for i in range(2000)]
    counts = np.bincount(draws, minlength=CLASSES)
    assert counts.min() > 150 and counts.max() < 250  # 200 each expected, sd ~13


def test_one_hot_and_refusals():
    np.testing.assert_array_equal(labels.one_hot([2, 0], 3).numpy(), [[0, 0, 1], [1, 0, 0]])
    assert labels.one_hot([2, 0], 0) is None
    with pytest.raises(ValueError, match="class -1 is not in"):
        labels.one_hot([1, -1], 3)
    with pytest.raises(ValueError, match="label_dim 3"):
        labels.check_dataset(np.array([0, 3]), 3, "d.npz")


def test_the_label_changes_the_conditional_network():
    net = conditional_net()
    x = torch.randn(2, 1, 8, 8)
    a = net(x, torch.ones(2), labels.one_hot([1, 2], CLASSES))
    b = net(x, torch.ones(2), labels.one_hot([3, 4], CLASSES))
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("x_T", ["noise", "data_plus_noise"])
def test_trajectories_store_their_class_and_are_solved_for_it(teacher, dataset, tmp_path, x_T):
    spec = {**SPEC, "x_T": x_T}
    images, classes = datasets.load(dataset)
    data = torch.from_numpy(datasets.to_model_range(images)) if x_T == "data_plus_noise" else None
    net, meta = checkpoints.load(teacher)
    gen = trajectories.Generator(net, meta, spec, torch.device("cpu"), data, classes if data is not None else None)
    out = gen.batch([0, 1, 2, 3])
    for i, states, _, m in out:
        want = int(classes[m["data_index"]]) if data is not None else labels.random_label(spec["seed"], i, CLASSES)
        assert m["label"] == want
        # the stored states are the solve for that class, not for another
        x_T_ = torch.from_numpy(states[:1])
        for cls, same in ((want, True), ((want + 1) % CLASSES, False)):
            onehot = labels.one_hot([cls], CLASSES)

            def denoise(x, s, onehot=onehot):
                return gen.denoise(x, s, onehot)

            solved = gen.solve(denoise, x_T_, gen.sigmas, order=spec["order"],
                               lower_order_final=True)[0].numpy()
            assert np.allclose(solved, states, atol=1e-4) == same
    # written, read back, spot-checked; a shard whose classes were altered is refused
    path = tmp_path / "shard-000000.tar"
    shards.write_shard(path, out)
    assert [s["meta"]["label"] for s in shards.read_shard(path)] == [m["label"] for *_, m in out]
    assert trajectories.spot_check(2, [path], spec, teacher, dataset) == 2
    shards.write_shard(path, [(i, s, sg, {**m, "label": (m["label"] + 1) % CLASSES}) for i, s, sg, m in out])
    with pytest.raises(ValueError, match="stored with class"):
        trajectories.spot_check(2, [path], spec, teacher, dataset)


def test_cmt_cm_loss_tiles_each_trajectory_class_over_its_points():
    net = conditional_net()
    states, sigmas = torch.randn(2, 5, 1, 8, 8), torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002])
    onehot = labels.one_hot([3, 8], CLASSES)
    got = losses.cmt_cm_loss(net, states, sigmas, losses.l2_distance, onehot)
    want = torch.cat([losses.cmt_cm_loss(net, states[k:k + 1], sigmas, losses.l2_distance, onehot[k:k + 1])
                      for k in range(2)])
    torch.testing.assert_close(got, want)
    other = losses.cmt_cm_loss(net, states, sigmas, losses.l2_distance, onehot.flip(0))
    assert not torch.allclose(got, other)


def labelled_manifest(teacher, folder):
    net, meta = checkpoints.load(teacher)
    spec = {**SPEC, "nfe": 4}
    gen = trajectories.Generator(net, meta, spec, torch.device("cpu"))
    entries = []
    for k in range(2):
        path = folder / f"shard-{k:06d}.tar"
        shards.write_shard(path, gen.batch(list(range(4 * k, 4 * k + 4))))
        entries.append({"path": str(path), "count": 4, "bytes": path.stat().st_size,
                        "sha256": atomic.sha256_file(path), "receipt": str(folder / f"{k}.json")})
    manifest = {"spec": spec, "teacher": {"path": str(teacher), "sha256": "-"}, "total": 8, "shards": entries}
    atomic.write_json(folder / "manifest.json", manifest)
    return folder / "manifest.json"


def test_midtrain_passes_each_trajectory_class(teacher, tmp_path, monkeypatch):
    manifest = labelled_manifest(teacher, tmp_path)
    stored = {s["states"][0].tobytes(): s["meta"]["label"]
              for e in json.loads(manifest.read_text())["shards"] for s in shards.read_shard(e["path"])}
    seen = []
    loss = losses.cmt_cm_loss
    monkeypatch.setattr(losses, "cmt_cm_loss", lambda net, st, sg, d, lab=None, **k: seen.append((st, lab)) or
                        loss(net, st, sg, d, lab, **k))
    cfg = midtrain_config(steps=2, batch=8, distance="l2")
    run_in_process("stages.midtrain", ["--config", json.dumps(cfg), "--teacher", teacher, "--manifest", manifest,
                                       "--spot-check", "1", "--out", tmp_path / "mid.safetensors"])
    assert len(seen) == 2
    for states, onehot in seen:
        assert onehot.shape == (2, CLASSES)
        for traj, row in zip(states, onehot, strict=True):
            assert int(row.argmax()) == stored[traj[0].numpy().tobytes()]


def test_posttrain_passes_the_batch_classes(teacher, dataset, tmp_path, monkeypatch):
    images, classes = datasets.load(dataset)
    by_image = {datasets.to_model_range(img).tobytes(): int(c) for img, c in zip(images, classes, strict=True)}
    seen = []
    loss = losses.ect_loss
    monkeypatch.setattr(losses, "ect_loss",
                        lambda net, y, g, **k: seen.append((y, k["labels"])) or loss(net, y, g, **k))
    cfg = posttrain_config(steps=2, batch=4, snapshots=[0, 1.0])
    run_in_process("stages.posttrain", ["--config", json.dumps(cfg), "--init", "teacher", "--init-model", teacher,
                                        "--dataset", dataset, "--out", tmp_path / "post.safetensors",
                                        "--snapshots", tmp_path / "snaps"])
    assert len(seen) == 2
    for y, onehot in seen:
        assert [int(i) for i in onehot.argmax(1)] == [by_image[img.numpy().tobytes()] for img in y]


def test_sample_draws_seeded_classes_and_records_them(teacher, tmp_path):
    # the teacher's EMA as an ECM model (the sample stage's contract)
    net, meta = checkpoints.load(teacher, kind="ecm")
    path = tmp_path / "model.safetensors"
    checkpoints.save(path, ema=net, meta={**meta, "precond": "ecm"})
    cfg = {"seed": 11, "sigma_mid": 1.2, "num_ranges": 1, "per_range": 5, "batch": 2, "steps": [1]}
    run_in_process("stages.sample", ["--config", json.dumps(cfg), "--model", path, "--out", tmp_path / "s.npz"])
    with np.load(tmp_path / "s.npz") as f:
        got, images = f["labels_r0"], f["images_1step_r0"]
    want = [labels.random_label(11, i, CLASSES) for i in range(5)]
    np.testing.assert_array_equal(got, want)
    from stages.core import rng
    z = torch.stack([torch.randn(1, 8, 8, generator=rng.generator(11, i, "z")) for i in range(5)])
    net.eval()
    with torch.no_grad():
        for cls, close in ((want, True), ([(c + 1) % CLASSES for c in want], False)):
            x = datasets.to_uint8(net(80.0 * z, 80.0, F.one_hot(torch.tensor(cls), CLASSES).float())).numpy()
            assert (np.abs(x.astype(int) - images.astype(int)).max() <= 1) == close
