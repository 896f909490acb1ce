"""EDM / ECM preconditioning (docs/method.md#preconditioning) against hand-computed coefficients."""

import math

import pytest
import torch

# Tiny tensors: intra-op threads only add synchronisation (100x slower on a busy 2-core box).
from stages import networks
from stages.networks.precond import Precond, ecm_boundary_coefficients, edm_coefficients

torch.set_num_threads(1)

SD, SMIN = 0.5, 0.002
ARCH = {"kind": "small_unet", "in_channels": 1, "resolution": 8, "channels": 8, "channel_mult": [1, 2],
        "num_blocks": 1, "dropout": 0.0}


def random_net(seed=0, **overrides):
    torch.manual_seed(seed)
    net = networks.build({**ARCH, **overrides})
    with torch.no_grad():  # the output conv is zero-initialised: make F non-zero
        net.conv_out.weight.normal_(0, 0.3)
        net.conv_out.bias.normal_(0, 0.3)
    return net


def inputs(seed=1, batch=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=g)


def test_random_network_output_is_nonzero():
    net = random_net()
    out = net(inputs(), torch.full((3,), math.log(0.3) / 4))
    assert out.abs().max() > 1e-2


def test_ecm_eval_is_identity_at_sigma_min():
    pre = Precond(random_net(), kind="ecm", sigma_data=SD, sigma_boundary=SMIN).eval()
    x = inputs()
    with torch.no_grad():
        out = pre(x, torch.full((3,), SMIN))
        out_scalar = pre(x, SMIN)
    assert torch.equal(out, x)
    assert torch.equal(out_scalar, x)


def test_ecm_train_mode_uses_edm_coefficients_and_is_not_identity():
    net = random_net()
    pre = Precond(net, kind="ecm", sigma_data=SD, sigma_boundary=SMIN).train()
    x = inputs()
    sigma = torch.full((3,), SMIN)
    with torch.no_grad():
        out = pre(x, sigma)
        s = sigma.view(-1, 1, 1, 1)
        c_skip = SD**2 / (s**2 + SD**2)
        c_out = s * SD / (s**2 + SD**2).sqrt()
        c_in = 1 / (s**2 + SD**2).sqrt()
        expected = c_skip * x + c_out * net(c_in * x, sigma.log() / 4)
    assert (out - x).abs().max() > 1e-5
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # and an EDM precond around the same network agrees in train mode
    edm = Precond(net, kind="edm", sigma_data=SD, sigma_boundary=SMIN).eval()
    with torch.no_grad():
        torch.testing.assert_close(edm(x, sigma), out, rtol=0, atol=0)


@pytest.mark.parametrize("sigma, c_skip, c_out, c_in", [
    (0.002, 0.25 / 0.250004, 0.001 / math.sqrt(0.250004), 1 / math.sqrt(0.250004)),
    (0.5, 0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5)),
    (80.0, 0.25 / 6400.25, 40.0 / math.sqrt(6400.25), 1 / math.sqrt(6400.25)),
])
def test_edm_coefficients_hand_values(sigma, c_skip, c_out, c_in):
    got = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), SD)
    for value, want in zip(got, (c_skip, c_out, c_in), strict=True):
        assert value.item() == pytest.approx(want, rel=1e-12)


def test_edm_coefficient_identities():
    sigma = torch.logspace(-3, 2, 41, dtype=torch.float64)
    c_skip, c_out, c_in = edm_coefficients(sigma, SD)
    # unit-variance network input and training target (Karras et al. 2022, appendix B.6)
    torch.testing.assert_close(c_in**2 * (sigma**2 + SD**2), torch.ones_like(sigma))
    torch.testing.assert_close(c_out**2, (1 - c_skip) ** 2 * SD**2 + c_skip**2 * sigma**2)
    torch.testing.assert_close(c_skip + (sigma / SD) ** 2 * c_skip, torch.ones_like(sigma))
    # limits
    c_skip0, c_out0, _ = edm_coefficients(torch.tensor(1e-9, dtype=torch.float64), SD)
    assert c_skip0.item() == pytest.approx(1.0, abs=1e-15)
    assert c_out0.item() == pytest.approx(0.0, abs=1e-8)
    c_skip_inf, c_out_inf, _ = edm_coefficients(torch.tensor(1e6, dtype=torch.float64), SD)
    assert c_skip_inf.item() < 1e-12 and c_out_inf.item() == pytest.approx(SD, rel=1e-9)


def test_ecm_boundary_coefficients_formula():
    sigma = torch.tensor([0.002, 0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = ecm_boundary_coefficients(sigma, SD, SMIN)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(SD**2 / ((s - SMIN) ** 2 + SD**2), rel=1e-12)
        assert c_out[i].item() == pytest.approx((s - SMIN) * SD / math.sqrt(s**2 + SD**2), rel=1e-12, abs=1e-300)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + SD**2), rel=1e-12)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0


@pytest.mark.parametrize("boundary, c_skip, c_out", [(0.003, 0.271998, 0.425479), (0.002, 0.271515, 0.425999)])
def test_ecm_boundary_at_the_two_step_sigma(boundary, c_skip, c_out):
    # sigma_mid = 0.821: the official ECMPrecond's boundary 0.003 against the grid's end 0.002
    # (by hand: 0.25 / (0.818^2 + 0.25) and 0.818 * 0.5 / sqrt(0.821^2 + 0.25))
    got = ecm_boundary_coefficients(torch.tensor(0.821, dtype=torch.float64), SD, boundary)
    assert (round(got[0].item(), 6), round(got[1].item(), 6)) == (c_skip, c_out)


def test_the_boundary_from_the_config_reaches_the_model_a_stage_builds():
    from stages.files import checkpoints

    teacher_meta = {"architecture": ARCH, "precond": "edm", "sigma_data": SD, "sigma_min": 0.002}
    student = checkpoints.build(teacher_meta, kind="ecm", sigma_boundary=0.003).eval()
    c_skip, c_out, _ = student.coefficients(torch.tensor(0.821, dtype=torch.float64))
    assert (round(c_skip.item(), 6), round(c_out.item(), 6)) == (0.271998, 0.425479)
    assert checkpoints.build({**teacher_meta, "precond": "ecm"}).sigma_boundary == 0.002
    # a student's file names its boundary; one written before `sigma_boundary` existed kept it in sigma_min
    assert checkpoints.build({**teacher_meta, "precond": "ecm", "sigma_boundary": 0.003}).sigma_boundary == 0.003
    assert checkpoints.build({**teacher_meta, "precond": "ecm", "sigma_min": 0.003}).sigma_boundary == 0.003


class _Recorder(torch.nn.Module):
    """F(x, c_noise) = 2 x + c_noise, recording its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c_noise):
        self.calls.append((x.clone(), c_noise.clone()))
        return 2 * x + c_noise.view(-1, 1, 1, 1)


@pytest.mark.parametrize("kind, training", [("edm", True), ("edm", False), ("ecm", True), ("ecm", False)])
def test_forward_composition_by_hand(kind, training):
    rec = _Recorder()
    pre = Precond(rec, kind=kind, sigma_data=SD, sigma_boundary=SMIN).train(training)
    x = inputs(batch=4)
    sigmas = [0.002, 0.3, 2.0, 80.0]
    out = pre(x, torch.tensor(sigmas))
    (fx, fc), = rec.calls
    for i, s in enumerate(sigmas):
        c_in = 1 / math.sqrt(s**2 + SD**2)
        if kind == "ecm" and not training:
            c_skip = SD**2 / ((s - SMIN) ** 2 + SD**2)
            c_out = (s - SMIN) * SD / math.sqrt(s**2 + SD**2)
        else:
            c_skip = SD**2 / (s**2 + SD**2)
            c_out = s * SD / math.sqrt(s**2 + SD**2)
        c_noise = math.log(s) / 4
        assert fc[i].item() == pytest.approx(c_noise, rel=1e-6)
        torch.testing.assert_close(fx[i], c_in * x[i], rtol=1e-6, atol=1e-6)
        want = c_skip * x[i] + c_out * (2 * c_in * x[i] + c_noise)
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)


def test_edm_train_and_eval_agree_without_dropout():
    pre = Precond(random_net(), kind="edm", sigma_data=SD, sigma_boundary=SMIN)
    x = inputs()
    sigma = torch.tensor([0.002, 0.7, 80.0])
    with torch.no_grad():
        a = pre.train()(x, sigma)
        b = pre.eval()(x, sigma)
    assert torch.equal(a, b)
    assert (a - x).abs().max() > 1e-3  # a real, non-trivial output


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="precond kind"):
        Precond(random_net(), kind="vp")
