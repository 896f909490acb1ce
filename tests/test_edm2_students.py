"""EDM2 networks as teachers and students in the pipeline: the row's network section (preset and
overrides), plain EDM preconditioning for students in both modes, the uncertainty head frozen, the
consistency target computed without forced weight normalisation, a tiny EDM2 teacher trained here."""

import copy
import json

import torch

from stages import networks
from stages.core import rng
from stages.files import checkpoints
from stages.networks import edm2
from tests.stagekit import config, make_dataset, posttrain_config, run_in_process

NETWORK = {"kind": "edm2", "preset": "edm2-img64-s", "label_dim": 10, "channels": 8, "channel_mult": [1, 2],
           "num_blocks": 1, "attn_resolutions": [4], "channels_per_head": 8, "logvar_channels": 8}


def test_network_section_expands_the_preset():
    arch = networks.architecture(NETWORK, 1, 8, 0.1)
    assert arch == {**edm2.preset("edm2-img64-s"), "in_channels": 1, "resolution": 8, "dropout": 0.1,
                    **{k: v for k, v in NETWORK.items() if k != "preset"}}
    assert networks.architecture({"kind": "small_unet", "channels": 8}, 1, 8, 0.0) == {
        "kind": "small_unet", "channels": 8, "in_channels": 1, "resolution": 8, "dropout": 0.0}
    assert networks.student_kind(arch) == "edm" and networks.student_kind({"kind": "ddpmpp"}) == "ecm"


def test_target_context_keeps_the_weights_in_the_target_pass():
    torch.manual_seed(0)
    net = networks.build_precond(networks.architecture(NETWORK, 1, 8, 0.0)).train()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # weights off the unit norm: forced weight normalisation would rewrite them
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.ones(2), torch.eye(10)[:2]
    before = copy.deepcopy(net.state_dict())
    with torch.no_grad(), networks.target_context(net)():
        net(x, sigma, labels)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        net(x, sigma, labels)  # the prediction's pass does normalise them, in place
    assert not torch.equal(before["unet.enc.8x8_block0.conv_res0.weight"],
                           net.state_dict()["unet.enc.8x8_block0.conv_res0.weight"])
    assert networks.target_context(networks.build_precond({"kind": "small_unet", "in_channels": 1,
                                                           "resolution": 8, "channels": 8})) is None


def test_tiny_edm2_teacher_trains_and_posttrains_as_an_edm_student(tmp_path):
    """train_teacher builds the tiny EDM2 from the row's section; posttrain (ECT) from it writes an
    EDM-preconditioned student whose uncertainty head took no step."""
    dataset = make_dataset(tmp_path / "data")
    cfg = config(network=NETWORK, teacher={"steps": 2, "batch": 4, "optimizer": {"name": "adam", "lr": 1e-3},
                                           "ema": {"beta": 0.9}})
    teacher_cfg = {"seed": 1, "network": cfg["network"], "teacher": cfg["teacher"], "sigma_data": 0.5,
                   "sigma_min": 0.002, "sigma_max": 80.0}
    teacher = tmp_path / "teacher" / "model.safetensors"
    run_in_process("stages.train_teacher", ["--config", json.dumps(teacher_cfg), "--dataset", dataset,
                                            "--key", "k", "--out", teacher])
    net, meta = checkpoints.load(teacher, which="net")
    assert isinstance(net, edm2.EDM2Precond) and meta["architecture"]["channels"] == 8
    torch.manual_seed(rng.fold(1, "teacher-init"))  # the stage's initialisation
    fresh = dict(networks.build_precond(meta["architecture"]).named_parameters())
    assert all(torch.equal(p, fresh[n]) for n, p in net.named_parameters() if n.startswith("logvar"))
    assert not all(torch.equal(p, fresh[n]) for n, p in net.named_parameters() if n.startswith("unet"))

    post = tmp_path / "post" / "model.safetensors"
    run_in_process("stages.posttrain", ["--config", json.dumps(posttrain_config(steps=2, batch=4, snapshots=[0, 1])),
                                        "--init", "teacher", "--init-model", teacher, "--dataset", dataset,
                                        "--out", post, "--snapshots", tmp_path / "snaps"])
    student, smeta = checkpoints.load(post, which="net")
    assert smeta["precond"] == "edm" and student.kind == "edm"
    teacher_ema = checkpoints.load(teacher, which="ema")[0].state_dict()
    for name, value in student.state_dict().items():
        if name.startswith("logvar"):
            assert torch.equal(value, teacher_ema[name]), name
    # sampling reads it back as EDM (no ECM boundary): f(x, s) = c_skip x + c_out F at every s
    student.eval()
    x, labels = torch.randn(1, 1, 8, 8), torch.eye(10)[:1]
    raw = student.unet(x / (0.002**2 + 0.25) ** 0.5, torch.tensor([0.002]).log() / 4, labels)
    c_skip, c_out = 0.25 / (0.002**2 + 0.25), 0.002 * 0.5 / (0.002**2 + 0.25) ** 0.5
    with torch.no_grad():
        torch.testing.assert_close(student(x, 0.002, labels), c_skip * x + c_out * raw)
