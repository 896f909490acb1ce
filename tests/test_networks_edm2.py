"""EDM2's magnitude-preserving U-Net: the official layout (names, shapes, counts), the MP layers
against hand-computed values and their statistics, forced weight normalisation, a tiny network in
train and eval mode, and outputs pinned from the official implementation."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_edm2 import TINY, tiny_inputs, tiny_net

from stages import networks
from stages.files import checkpoints
from stages.networks import edm2
from stages.networks.edm2 import MPConv, MPFourier, forced_weight_norm, mp_cat, mp_silu, mp_sum, normalize
from stages.networks.precond import Precond, edm_coefficients

torch.set_num_threads(1)

# ---- layout -------------------------------------------------------------------------------------

# Parameter counts of the official presets (label_dim 1000, logvar head included) and the sha256 of
# the ordered "name shape" list; that list was checked equal, name for name and in order, to the
# official networks_edm2.Precond's state_dict for every preset.
PRESET_LAYOUTS = {
    "edm2-img512-xs": (124_713_253, "db753f9378e904130563ddf60074928cc70fa7b9ce87af531ec23aec677ebb14"),
    "edm2-img512-s": (280_212_837, "0734abdb9d05ae211d8b511fd15339b6af076127fc42befcbfa9385227aea86b"),
    "edm2-img512-m": (497_807_781, "38eb3bdc88cdde6e8f887da08e1752c484791b8daa461a44feee3bd68f870dbe"),
    "edm2-img512-xxl": (1_523_164_773, "9fa47a1933941992c1eef36c81580f83a1d5afcc164ce53d38f7fe1e94b81fe4"),
    "edm2-img64-s": (280_209_381, "c228646a3016951aace3b1126ccf39fd6b7ae95d44d23319b7ab968adc7ef018"),
    "edm2-img64-xl": (1_119_276_837, "341b1cdf7847a39f665bcff82c5583ec4c1fe893dd335d7af1afc0b56e0c38b8"),
}


def layout_digest(state):
    return hashlib.sha256("\n".join(f"{k} {tuple(t.shape)}" for k, t in state.items()).encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(PRESET_LAYOUTS))
def test_preset_layouts_and_parameter_counts(name):
    count, digest = PRESET_LAYOUTS[name]
    with torch.device("meta"):  # no memory, no time: the 1.5B model included
        net = networks.build_precond(edm2.preset(name))
    state = net.state_dict()
    assert len(state) == 203
    assert sum(p.numel() for p in net.parameters()) == count
    buffers = [k for k, _ in net.named_buffers()]
    assert buffers == ["unet.emb_fourier.freqs", "unet.emb_fourier.phases", "logvar_fourier.freqs",
                       "logvar_fourier.phases"]
    assert layout_digest(state) == digest


def test_img64_s_layout_spot_checks():
    arch = edm2.preset("edm2-img64-s")
    assert arch["in_channels"] == 3 and arch["channels"] == 192 and arch["dropout"] == 0.0
    assert edm2.preset("edm2-img512-xxl")["in_channels"] == 4 and edm2.preset("edm2-img512-xxl")["dropout"] == 0.1
    with torch.device("meta"):
        state = networks.build_precond(arch).state_dict()
    spot = {
        "unet.out_gain": (),
        "unet.emb_fourier.freqs": (192,),
        "unet.emb_noise.weight": (768, 192),
        "unet.emb_label.weight": (768, 1000),
        "unet.enc.64x64_conv.weight": (192, 4, 3, 3),  # 3 channels + the ones channel
        "unet.enc.64x64_block0.conv_res0.weight": (192, 192, 3, 3),
        "unet.enc.32x32_down.emb_gain": (),
        "unet.enc.32x32_block0.conv_skip.weight": (384, 192, 1, 1),
        "unet.enc.32x32_block0.conv_res0.weight": (384, 384, 3, 3),  # enc: after the skip projection
        "unet.enc.16x16_block0.attn_qkv.weight": (1728, 576, 1, 1),
        "unet.enc.8x8_block2.attn_proj.weight": (768, 768, 1, 1),
        "unet.dec.8x8_in0.attn_qkv.weight": (2304, 768, 1, 1),
        "unet.dec.8x8_block0.conv_res0.weight": (768, 1536, 3, 3),  # dec: before the skip projection
        "unet.dec.64x64_block3.conv_skip.weight": (192, 384, 1, 1),
        "unet.dec.64x64_block3.emb_linear.weight": (192, 768),
        "unet.out_conv.weight": (3, 192, 3, 3),
        "logvar_fourier.phases": (128,),
        "logvar_linear.weight": (1, 128),
    }
    for name, shape in spot.items():
        assert tuple(state[name].shape) == shape, name
    for absent in ("unet.dec.8x8_in1.attn_qkv.weight", "unet.enc.64x64_block0.attn_qkv.weight",
                   "unet.enc.32x32_down.conv_skip.weight", "unet.dec.32x32_up.attn_proj.weight"):
        assert absent not in state


def test_preset_names_are_checked():
    with pytest.raises(ValueError, match="unknown EDM2 preset 'edm2-img256-s'"):
        edm2.preset("edm2-img256-s")
    with pytest.raises(ValueError, match="unknown settings"):
        edm2.preset("edm2-img64-s", channel=3)
    assert edm2.preset("edm2-img64-s", label_dim=0, dropout=0.2)["dropout"] == 0.2


# ---- magnitude-preserving building blocks --------------------------------------------------------

def test_normalize_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    # ||[3, 4]|| = 5 over n = 2 elements: divide by eps + 5 / sqrt(2); a zero row stays zero
    want = torch.tensor([[3.0, 4.0], [0.0, 0.0]]) / (1e-4 + 5 / math.sqrt(2))
    assert torch.allclose(normalize(x), want, rtol=1e-6, atol=0)
    pixels = torch.tensor([1.0, 2.0, 2.0]).reshape(1, 3, 1, 1).expand(2, 3, 2, 2)  # |.| = 3 over 3 channels
    assert torch.allclose(normalize(pixels, dim=1), pixels / (1e-4 + 3 / math.sqrt(3)), rtol=1e-6)


def test_mp_silu_constant_is_the_rms_of_silu_under_a_unit_gaussian():
    # E[silu(x)^2] for x ~ N(0, 1) by quadrature on [-12, 12] (deterministic ground truth)
    x = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
    density = torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi)
    rms = torch.trapezoid(F.silu(x) ** 2 * density, x).sqrt().item()
    assert abs(rms - 0.596) < 5e-4  # 0.5960... : the paper's constant is this value, rounded
    assert torch.allclose(mp_silu(torch.tensor([1.0, -2.0])),
                          torch.tensor([1 / (1 + math.exp(-1)), -2 / (1 + math.exp(2))]) / 0.596)


def test_mp_sum_and_mp_cat_by_hand():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5])
    want = (0.7 * a + 0.3 * b) / math.sqrt(0.7**2 + 0.3**2)
    assert torch.allclose(mp_sum(a, b, 0.3), want)

    a, b = torch.ones(1, 2, 1, 1), torch.ones(1, 6, 1, 1)
    # N_a = 2, N_b = 6, t = 0.5: C = sqrt(8 / 0.5) = 4, w_a = 4 * 0.5 / sqrt(2), w_b = 4 * 0.5 / sqrt(6)
    got = mp_cat(a, b, 0.5).flatten()
    assert torch.allclose(got, torch.tensor([math.sqrt(2)] * 2 + [2 / math.sqrt(6)] * 6))
    assert got.square().mean().item() == pytest.approx(1.0)  # unit-RMS parts give a unit-RMS whole
    # t = 0.25 puts 3/4 of the total energy (before balancing) on a
    got = mp_cat(a, b, 0.25).flatten()
    assert got[:2].square().sum() / got.square().sum() == pytest.approx(0.75**2 / (0.75**2 + 0.25**2))


def test_mp_layers_preserve_unit_variance_statistically():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    assert mp_sum(a, b, 0.3).var().item() == pytest.approx(1.0, abs=0.015)
    assert mp_silu(a).square().mean().item() == pytest.approx(1.0, abs=0.015)
    cat = mp_cat(torch.randn(50, 16, 8, 8, generator=g), torch.randn(50, 48, 8, 8, generator=g), 0.3)
    assert cat.square().mean().item() == pytest.approx(1.0, abs=0.015)

    x = torch.randn(64, 32, 12, 12, generator=g)
    for kernel in ((3, 3), (1, 1)):
        conv = MPConv(32, 24, kernel).eval()
        with torch.no_grad():
            conv.weight.mul_(7.0)  # the stored scale does not matter
        y = conv(x)[:, :, 1:-1, 1:-1]  # interior pixels: zero padding feeds the border fewer inputs
        assert y.var().item() == pytest.approx(1.0, abs=0.03), kernel
        assert conv(x, gain=0.5).var().item() == pytest.approx(0.25 * conv(x).var().item(), rel=1e-5)
    linear = MPConv(256, 40, ()).eval()
    assert linear(torch.randn(20_000, 256, generator=g)).var().item() == pytest.approx(1.0, abs=0.02)

    fourier = MPFourier(4096)
    assert fourier(torch.randn(64, generator=g)).square().mean().item() == pytest.approx(1.0, abs=0.03)


def test_mpconv_effective_weight_and_fourier_by_hand():
    linear = MPConv(2, 2, ()).eval()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    # effective rows w_i / ||w_i|| (up to eps): [0.6, 0.8] and [0, -1]
    got = linear(torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(got, torch.tensor([[1.4, -1.0]]), atol=1e-4)

    fourier = MPFourier(3)
    with torch.no_grad():
        fourier.freqs.copy_(torch.tensor([1.0, -2.0, 0.5]))
        fourier.phases.copy_(torch.tensor([0.0, 1.0, 3.0]))
    c = torch.tensor([0.7])
    want = math.sqrt(2) * torch.cos(torch.tensor([0.7, -1.4 + 1.0, 0.35 + 3.0]))
    assert torch.allclose(fourier(c)[0], want, atol=1e-6)


def test_forced_weight_normalisation():
    torch.manual_seed(0)
    conv = MPConv(6, 5, (3, 3))
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.03, 0.5, 1.0, 4.0, 300.0]).reshape(-1, 1, 1, 1))
    before = conv.weight.detach().clone()
    x = torch.randn(2, 6, 4, 4)
    out_eval = conv.eval()(x)
    assert torch.equal(conv.weight, before)  # eval mode: the stored weight is left alone

    out_train = conv.train()(x)
    fan_in = 6 * 3 * 3
    # The paper's forced weight normalisation (eq. 66): each output channel's stored weight becomes
    # w_i / (eps + ||w_i|| / sqrt(N)), i.e. norm sqrt(N) r / (eps + r) with r = ||w_i|| / sqrt(N)
    r = before.flatten(1).norm(dim=1) / math.sqrt(fan_in)
    want = math.sqrt(fan_in) * r / (1e-4 + r)
    assert torch.allclose(conv.weight.flatten(1).norm(dim=1), want, rtol=1e-5)
    assert torch.allclose(conv.weight.flatten(1).norm(dim=1), torch.full((5,), math.sqrt(fan_in)), rtol=1e-2)
    assert torch.allclose(conv.weight, before / (1e-4 + r.reshape(-1, 1, 1, 1)), rtol=1e-5)
    # the output is scale invariant: train and eval agree up to the eps
    assert torch.allclose(out_train, out_eval, rtol=1e-2, atol=1e-3)

    # and switched off (ECD's target pass): training mode, weight untouched, flag restored after
    torch.manual_seed(1)
    net = tiny_net()
    net.train()
    stored = {k: v.clone() for k, v in net.state_dict().items()}
    x, sigma, labels = tiny_inputs()
    with forced_weight_norm(net, False):
        net(x, sigma, labels)
    assert all(torch.equal(stored[k], v) for k, v in net.state_dict().items())
    assert all(m.force_weight_norm for m in net.modules() if isinstance(m, MPConv))
    net(x, sigma, labels)
    assert not torch.equal(stored["unet.out_conv.weight"], net.state_dict()["unet.out_conv.weight"])


def test_cosine_attention_against_explicit_formula():
    torch.manual_seed(3)
    block = edm2.Block(16, 16, emb_channels=8, flavor="dec", attention=True, channels_per_head=8).eval()
    x = torch.randn(2, 16, 4, 4)
    got = block.attention(x)
    # qkv output channels ordered (head, channel, q/k/v); q, k, v unit RMS over each head's channels
    qkv = block.attn_qkv(x).reshape(2, 2, 8, 3, 16)
    q, k, v = (normalize(qkv[:, :, :, i], dim=2) for i in range(3))  # [batch, head, channel, pixel]
    weights = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(8), dim=3)
    want = block.attn_proj(torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(2, 16, 4, 4))
    assert torch.allclose(got, want, atol=1e-5)


# ---- the network ---------------------------------------------------------------------------------

# The official networks_edm2.Precond (NVlabs/edm2 @ 4bf8162, use_fp16=False) loaded with tiny_net()'s
# tensors, on tiny_inputs(): sum of |F| per sample of the raw U-Net output F(c_in x, ln(sigma)/4,
# labels), F at four positions, and the uncertainty head u(sigma); eval mode and one train-mode
# forward (forced weight normalisation) from the same tensors.
OFFICIAL_EVAL_ABS_SUMS = [312.071, 278.876, 245.386, 303.794]
OFFICIAL_TRAIN_ABS_SUMS = [381.899, 331.578, 289.32, 364.781]
OFFICIAL_EVAL_POINTS = [0.12876, -0.19025, 0.41799, 0.91025]
OFFICIAL_LOGVAR = [0.552137, -1.057317, 0.962868, -1.127381]
POINTS = [(0, 0, 0, 0), (1, 2, 5, 9), (2, 1, 15, 3), (3, 0, 8, 8)]


def raw_output(net, x, sigma, labels):
    c_in = 1 / (sigma**2 + 0.25).sqrt()
    return net.unet(c_in.reshape(-1, 1, 1, 1) * x, sigma.log() / 4, labels)


def test_outputs_equal_the_official_implementation():
    x, sigma, labels = tiny_inputs()
    net = tiny_net().eval()
    with torch.no_grad():
        f = raw_output(net, x, sigma, labels)
        logvar = net.logvar(sigma).flatten()
    assert torch.allclose(f.abs().flatten(1).sum(1), torch.tensor(OFFICIAL_EVAL_ABS_SUMS), rtol=1e-4)
    assert torch.allclose(torch.stack([f[p] for p in POINTS]), torch.tensor(OFFICIAL_EVAL_POINTS),
                          rtol=1e-4, atol=1e-4)
    assert torch.allclose(logvar, torch.tensor(OFFICIAL_LOGVAR), rtol=1e-5, atol=1e-6)

    net = tiny_net().train()
    with torch.no_grad():
        f = raw_output(net, x, sigma, labels)
    assert torch.allclose(f.abs().flatten(1).sum(1), torch.tensor(OFFICIAL_TRAIN_ABS_SUMS), rtol=1e-4)


def test_precond_is_edm_around_the_unet_and_labels_matter():
    x, sigma, labels = tiny_inputs()
    net = tiny_net().eval()
    with torch.no_grad():
        d = net(x, sigma, labels)
        c_skip, c_out, _ = edm_coefficients(sigma.reshape(-1, 1, 1, 1), 0.5)
        assert torch.allclose(d, c_skip * x + c_out * raw_output(net, x, sigma, labels), rtol=1e-5, atol=1e-5)
        other = net(x, sigma, F.one_hot(torch.tensor([4, 4, 4, 4]), 10).float())
    assert ((other - d)[1:].flatten(1).abs().amax(1) > 1e-2).all()  # at sigma 0.002, c_out ~ 0


def test_tiny_network_in_train_and_eval_mode():
    x, sigma, labels = tiny_inputs()
    net = tiny_net(dropout=0.3)
    net.eval()
    with torch.no_grad():
        a, b = net(x, sigma, labels), net(x, sigma, labels)
    assert torch.equal(a, b) and torch.isfinite(a).all()

    net.train()
    w0 = net.unet.enc["8x8_block0"].conv_res0.weight.detach().clone()
    torch.manual_seed(5)
    d1 = net(x, sigma, labels)
    w1 = net.unet.enc["8x8_block0"].conv_res0.weight.detach().clone()
    assert not torch.equal(w0, w1)  # forced weight normalisation happened
    assert torch.allclose(w1.flatten(1).norm(dim=1), torch.full((32,), math.sqrt(32 * 9)), rtol=1e-2)
    d1.square().mean().backward()  # the in-place update outside autograd leaves backward intact
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert grads["unet.out_gain"].abs() > 0 and grads["unet.emb_label.weight"].abs().sum() > 0
    assert grads["logvar_linear.weight"] is None  # the uncertainty head is not part of D

    torch.manual_seed(5)
    d2 = net(x, sigma, labels)
    torch.manual_seed(6)
    d3 = net(x, sigma, labels)
    assert torch.allclose(d1, d2, atol=1e-4)  # same dropout mask (the weights were normalised already)
    assert ((d2 - d3)[1:].flatten(1).abs().amax(1) > 0.1).all()  # another mask


def test_labels_are_required_or_refused():
    x, sigma, labels = tiny_inputs()
    net = tiny_net()
    with pytest.raises(ValueError, match=r"class-conditional \(label_dim 10\)"):
        net(x, sigma)
    with pytest.raises(ValueError, match=r"one-hot floats of shape \[4, 10\].*F.one_hot"):
        net(x, sigma, torch.tensor([3, 7, 0, 9]))
    with pytest.raises(ValueError, match=r"shape \[4, 10\]"):
        net(x, sigma, labels[:, :5])
    uncond = tiny_net(label_dim=0)
    assert "unet.emb_label.weight" not in uncond.state_dict()
    with pytest.raises(ValueError, match=r"unconditional \(label_dim 0\)"):
        uncond(x, sigma, labels)
    assert uncond(x, sigma).shape == x.shape
    small = Precond(networks.build({"kind": "small_unet", "in_channels": 3, "resolution": 16, "channels": 8,
                                    "channel_mult": [1, 2], "num_blocks": 1, "dropout": 0.0}))
    with pytest.raises(ValueError, match="SmallUNet is unconditional"):
        small(x, sigma, labels)


def test_model_file_round_trip(tmp_path):
    net = tiny_net().eval()
    path = tmp_path / "model.safetensors"
    meta = {"architecture": TINY, "precond": "edm", "sigma_data": 0.5, "sigma_min": 0.002}
    checkpoints.save(path, ema=net, meta=meta)
    loaded, _ = checkpoints.load(path, which="ema")
    assert isinstance(loaded, edm2.EDM2Precond) and loaded.unet.label_dim == 10
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, sigma, labels), net(x, sigma, labels))
