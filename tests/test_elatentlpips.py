"""E-LatentLPIPS: the latent VGG16's layer list and slices, the distance against a hand computation,
its properties under augmentation (zero for identical inputs, symmetric, positive, the same draw on
both inputs), gradients, and the classifier head learning; the ADA operations against their
definitions (blits through ADA's resampling, colour formulas of both sources, the filter bank and its
gains, cutout, noise). The resampling itself: tests/test_ada_resample.py."""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from stages.method.ada_augment import (
    BLIT,
    COLOUR,
    GEOMETRIC,
    OPS,
    AdaAugment,
    band_filters,
    band_gains,
    colour_matrix,
)
from stages.method.elatentlpips import (
    ELatentLPIPS,
    LatentVGG16,
    feature_slices,
    unit_normalize,
)

TINY = dict(width=1 / 16, groups=4, hidden=32, pool=2)  # channels 4 ... 32


def tiny_vgg(seed=0, **kw):
    torch.manual_seed(seed)
    return LatentVGG16(**{**TINY, **kw})


def latents(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5


# ---------------------------------------------------------------------------------------------
# The latent VGG16 and its slices


def test_slices_are_the_specified_ranges_at_relu_ends():
    vgg = LatentVGG16(width=1 / 16, groups=4)
    assert feature_slices(vgg.features) == [(0, 6), (6, 12), (12, 21), (21, 31), (31, 41)]
    assert len(vgg.features) == 41
    kinds = [type(m) for m in vgg.features]
    assert kinds[:3] == [nn.Conv2d, nn.GroupNorm, nn.ReLU]
    assert [i for i, k in enumerate(kinds) if k is nn.MaxPool2d] == [21, 31]  # only two pools, not VGG's five
    assert sum(k is nn.Conv2d for k in kinds) == 13
    assert all(kinds[end - 1] is nn.ReLU for _, end in feature_slices(vgg.features))
    assert all(m.num_groups == 4 for m in vgg.features if isinstance(m, nn.GroupNorm))


def test_full_width_feature_shapes_on_a_64x64_latent():
    """The paper's network (GroupNorm(32), 4 input channels), run on the meta device: shapes only."""
    with torch.device("meta"):
        metric = ELatentLPIPS(LatentVGG16(), augment=None)
        vgg = LatentVGG16()
        feats = metric.features(torch.empty(2, 4, 64, 64))
        logits = vgg(torch.empty(2, 4, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 64, 64), (2, 128, 64, 64), (2, 256, 64, 64),
                                               (2, 512, 32, 32), (2, 512, 16, 16)]
    assert tuple(logits.shape) == (2, 1000)
    assert all(m.num_groups == 32 for m in vgg.features if isinstance(m, nn.GroupNorm))
    assert vgg.classifier[0].in_features == 512 * 7 * 7 and vgg.classifier[0].out_features == 4096


def test_width_that_does_not_split_into_groups_is_refused():
    with pytest.raises(ValueError, match="groups"):
        LatentVGG16(width=1 / 16, groups=32)


# ---------------------------------------------------------------------------------------------
# The distance


def test_distance_is_the_hand_computed_lpips_without_heads():
    vgg = tiny_vgg()
    metric = ELatentLPIPS(vgg, augment=None)
    x, y = latents(3, 4, 32, 32, seed=1), latents(3, 4, 32, 32, seed=2)
    expected = torch.zeros(3)
    hx, hy = x, y
    for start, end in [(0, 6), (6, 12), (12, 21), (21, 31), (31, 41)]:
        for layer in vgg.features[start:end]:
            hx, hy = layer(hx), layer(hy)
        # unit length over channels as the official normalize_tensor: f / sqrt(|f|^2 + 1e-8) (the eps
        # matters for the near-zero feature vectors of so narrow a network)
        nx = hx / (hx.square().sum(1, keepdim=True) + 1e-8).sqrt()
        ny = hy / (hy.square().sum(1, keepdim=True) + 1e-8).sqrt()
        expected += ((nx - ny) ** 2).sum(1).mean((1, 2))
    torch.testing.assert_close(metric(x, y), expected, rtol=1e-5, atol=1e-6)


def test_zero_for_identical_inputs_positive_and_symmetric_with_augmentation():
    metric = ELatentLPIPS(tiny_vgg())
    assert metric.augment is not None and metric.augment.p == 1 and metric.augment.ops == set(OPS)
    x, y = latents(4, 4, 32, 32, seed=1), latents(4, 4, 32, 32, seed=2)
    same = metric(x, x.clone(), generator=torch.Generator().manual_seed(0))
    assert same.shape == (4,) and same.abs().max() < 1e-6
    d_xy = metric(x, y, generator=torch.Generator().manual_seed(5))
    d_yx = metric(y, x, generator=torch.Generator().manual_seed(5))
    assert (d_xy > 0.05).all()
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-5, atol=1e-6)
    # the ensemble: another draw gives another value for the same pair
    assert (metric(x, y, generator=torch.Generator().manual_seed(6)) - d_xy).abs().max() > 1e-3
    # a closer pair is closer (on average over the draws)
    near = x + 0.05 * (y - x)
    assert metric(x, near, generator=torch.Generator().manual_seed(5)).mean() < d_xy.mean()


def test_the_augmentation_is_the_same_draw_on_both_inputs():
    vgg = tiny_vgg()
    metric, reference = ELatentLPIPS(vgg), ELatentLPIPS(vgg, augment=None)
    x, y = latents(2, 4, 32, 32, seed=1), latents(2, 4, 32, 32, seed=2)
    params = metric.augment.sample(x.shape, generator=torch.Generator().manual_seed(9))
    ax, ay = metric.augment.apply(x, params), metric.augment.apply(y, params)
    torch.testing.assert_close(metric(x, y, generator=torch.Generator().manual_seed(9)), reference(ax, ay),
                               rtol=1e-5, atol=1e-6)
    # and the module call hands both tensors the draw `sample` makes from that seed
    bx, by = metric.augment(x, y, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(bx, ax)
    torch.testing.assert_close(by, ay)


def test_gradient_reaches_the_first_input_only():
    metric = ELatentLPIPS(tiny_vgg()).double()  # float64 for the finite difference below
    x = latents(2, 4, 32, 32, seed=1).double().requires_grad_(True)
    y = latents(2, 4, 32, 32, seed=2).double()
    metric(x, y, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in metric.parameters())
    # a finite difference along a random direction agrees with the gradient
    v = torch.randn_like(x)
    h = 1e-7

    def d(z):
        return metric(z, y, generator=torch.Generator().manual_seed(0)).sum()

    with torch.no_grad():
        numeric = (d(x + h * v) - d(x - h * v)) / (2 * h)
    assert numeric.item() == pytest.approx((x.grad * v).sum().item(), rel=1e-3)


def test_unit_normalize_has_no_nan_gradient_at_zero_features():
    f = torch.zeros(1, 3, 2, 2, requires_grad=True)
    unit_normalize(f).sum().backward()
    assert torch.isfinite(f.grad).all()
    g = torch.tensor([[3.0, 4.0]]).reshape(1, 2, 1, 1)
    torch.testing.assert_close(unit_normalize(g).flatten(), torch.tensor([0.6, 0.8]))


def test_metric_stays_in_eval_mode_and_loads_from_safetensors(tmp_path):
    vgg = tiny_vgg(seed=3)
    save_file(vgg.state_dict(), str(tmp_path / "vgg.safetensors"))
    metric = ELatentLPIPS.from_file(tmp_path / "vgg.safetensors", TINY, augment=None).train()
    assert not metric.training
    x, y = latents(2, 4, 32, 32, seed=1), latents(2, 4, 32, 32, seed=2)
    torch.testing.assert_close(metric(x, y), ELatentLPIPS(vgg, augment=None)(x, y))
    with pytest.raises(ValueError, match="not the latent VGG16"):
        ELatentLPIPS.from_file(tmp_path / "vgg.safetensors", {**TINY, "width": 1 / 8})


def test_classifier_sgd_steps_lower_the_loss():
    """SGD with the paper's momentum 0.9 and weight decay 1e-4 (a smaller lr for a batch of 8, and no
    dropout, so ten steps on one fixed random batch show the head and trunk learning)."""
    model = tiny_vgg(seed=4, num_classes=4, dropout=0.0)
    x, labels = latents(8, 4, 16, 16, seed=5), torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(6))
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)

    def loss():
        return nn.functional.cross_entropy(model(x), labels)

    with torch.no_grad():
        before = loss().item()
    assert before == pytest.approx(math.log(4), rel=0.1)
    for _ in range(10):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.9 * before


# ---------------------------------------------------------------------------------------------
# The ADA operations


def draw(ops, x, seed=0, p=1.0):
    aug = AdaAugment(ops, p)
    params = aug.sample(x.shape, generator=torch.Generator().manual_seed(seed))
    return aug.apply(x, params), params


def test_blits_move_pixels_through_adas_resampling():
    """Integer translations come out exact; flips and quarter turns go through the sym6 resampling
    as in ADA, so they are the pixel moves up to the filter's asymmetry (test_ada_resample.py):
    close on a smooth image, each sample's draw identifiable."""
    x = latents(6, 4, 32, 32, seed=1)
    out, params = draw(["xint"], x, seed=2)
    for k in range(6):
        tx, ty = (int(v) for v in params.geometry[k, :2, 2].round())
        assert params.geometry[k, :2, :2].equal(torch.eye(2)) and abs(tx) <= 4 and abs(ty) <= 4
        src = x[k, :, max(-ty, 0):32 - max(ty, 0), max(-tx, 0):32 - max(tx, 0)]
        dst = out[k, :, max(ty, 0):32 - max(-ty, 0), max(tx, 0):32 - max(-tx, 0)]
        assert (dst - src).abs().max() < 1e-4
    grid = torch.arange(32.0)
    smooth = (torch.cos(0.2 * grid)[:, None] * torch.sin(0.15 * grid + 1)[None, :]).expand(6, 4, 32, 32)
    out, _ = draw(["xflip"], smooth)
    flipped = [(out[k] - smooth[k].flip(-1)).abs().max() < 0.05 for k in range(6)]
    kept = [(out[k] - smooth[k]).abs().max() < 1e-4 for k in range(6)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)
    out, _ = draw(["rotate90"], smooth, seed=1)
    turns = [[(out[k] - torch.rot90(smooth[k], r, (1, 2))).abs().max() < 0.05 for r in range(4)] for k in range(6)]
    assert all(sum(t) == 1 for t in turns) and len({t.index(True) for t in turns}) > 1


def test_geometric_draw_follows_adas_distributions():
    aug = AdaAugment(["scale", "aniso"])
    params = aug.sample((4000, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    a = params.geometry[:, :2, :2]
    # isotropic s times anisotropic (r, 1/r): det = s^2, log2 s ~ N(0, 0.2^2)
    log2_s = torch.log2(torch.linalg.det(a)) / 2
    assert log2_s.mean().abs() < 0.02 and log2_s.std().item() == pytest.approx(0.2, rel=0.05)
    aug = AdaAugment(["rotate"])
    params = aug.sample((4000, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    angle = torch.atan2(params.geometry[:, 1, 0], params.geometry[:, 0, 0])
    # two independent rotations U(-pi, pi): their sum wraps to a uniform angle
    assert angle.mean().abs() < 0.1 and angle.std().item() == pytest.approx(math.pi / math.sqrt(3), rel=0.05)
    # the maps act about the image centre: the centre pixel stays in place
    centre = torch.tensor([15.5, 15.5, 1.0])
    torch.testing.assert_close(params.geometry @ centre, centre.expand(4000, 3), atol=1e-4, rtol=0)


def test_colour_operations_of_sony_cmts_preset():
    """ADA's order on 4 channels, written out per operation: brightness added to every channel,
    contrast, luma flip (the channel mean reflected), hue rotation in the plane of
    u1 = (1, -1, 0, 0) / sqrt 2, u2 = (1, 1, -2, 0) / sqrt 6, saturation about the channel mean."""
    x = latents(3, 4, 32, 32, seed=1)
    out, prm = draw(COLOUR, x)
    view = lambda d: d.reshape(-1, 1, 1, 1)  # noqa: E731
    y = (x + view(prm.brightness)) * view(prm.contrast)
    y = y - 2 * view(prm.lumaflip) * y.mean(1, keepdim=True)
    u1 = torch.tensor([1.0, -1.0, 0.0, 0.0]).reshape(1, 4, 1, 1) / math.sqrt(2)
    u2 = torch.tensor([1.0, 1.0, -2.0, 0.0]).reshape(1, 4, 1, 1) / math.sqrt(6)
    a, b = (y * u1).sum(1, keepdim=True), (y * u2).sum(1, keepdim=True)
    cos, sin = view(prm.hue.cos()), view(prm.hue.sin())
    y = y + (a * (cos - 1) - b * sin) * u1 + (b * (cos - 1) + a * sin) * u2
    mean = y.mean(1, keepdim=True)
    torch.testing.assert_close(out, mean + (y - mean) * view(prm.saturation), rtol=1e-5, atol=1e-5)
    many = AdaAugment(COLOUR).sample((4000, 4, 8, 8), torch.Generator().manual_seed(0))
    assert many.brightness.std().item() == pytest.approx(0.2, rel=0.05)
    assert torch.log2(many.contrast).std().item() == pytest.approx(0.5, rel=0.05)
    assert torch.log2(many.saturation).std().item() == pytest.approx(1.0, rel=0.05)
    assert many.lumaflip.mean().item() == pytest.approx(0.5, abs=0.03)
    assert many.hue.abs().max() <= math.pi and many.hue.std().item() == pytest.approx(math.pi / math.sqrt(3), rel=0.05)


def test_hue_rotation_is_adas_rotation_about_the_luma_axis_in_rgb():
    """For 3 channels the rotation is Rodrigues' about v = (1, 1, 1) / sqrt 3 by the angle, and the
    luma flip is I - 2 v v^T; on 4 channels the matrix is a rotation that keeps v and
    (1, 1, 1, -3) / sqrt 12."""
    theta = torch.tensor([0.7, -2.1])
    m = colour_matrix(None, None, None, theta, None, channels=3)[:, :3, :3]
    v = torch.ones(3, dtype=torch.float64) / math.sqrt(3)
    cross = torch.tensor([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], dtype=torch.float64)
    for k, t in enumerate(theta.double()):
        rodrigues = torch.eye(3, dtype=torch.float64) + t.sin() * cross + (1 - t.cos()) * cross @ cross
        torch.testing.assert_close(m[k], rodrigues)
    flip = colour_matrix(None, None, torch.ones(1), None, None, channels=3)[0, :3, :3]
    torch.testing.assert_close(flip, torch.eye(3, dtype=torch.float64) - 2 * torch.outer(v, v))
    m4 = colour_matrix(None, None, None, theta, None, channels=4)[:, :4, :4]
    torch.testing.assert_close(m4 @ m4.transpose(1, 2), torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    for axis in (torch.ones(4), torch.tensor([1.0, 1.0, 1.0, -3.0])):
        torch.testing.assert_close(m4 @ axis.double(), axis.double().expand(2, 4))
    assert torch.linalg.det(m4).allclose(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="3 channels"):
        colour_matrix(None, None, None, theta, None, channels=2)


def test_colour_operations_of_the_elatentlpips_release():
    """Brightness + U(-0.5, 0.5), contrast about the sample's mean by U(0.5, 1.5), saturation about
    the channel mean by U(0, 2), every sample drawn (no gate: p = 0 changes nothing), and no luma
    flip, hue rotation or image filter: "bgcfnc" keeps what the release implements."""
    aug = AdaAugment("bgcfnc", p=0.0, source="elatentlpips_release")
    assert aug.ops == set(BLIT + GEOMETRIC + ("brightness", "contrast", "saturation", "noise", "cutout"))
    x = latents(3, 4, 32, 32, seed=1)
    colour = AdaAugment(["brightness", "contrast", "saturation"], p=0.0, source="elatentlpips_release")
    prm = colour.sample(x.shape, generator=torch.Generator().manual_seed(0))
    view = lambda d: d.reshape(-1, 1, 1, 1)  # noqa: E731
    y = x + view(prm.brightness)
    mean = y.mean((1, 2, 3), keepdim=True)
    y = mean + (y - mean) * view(prm.contrast)
    mean = y.mean(1, keepdim=True)
    torch.testing.assert_close(colour.apply(x, prm), mean + (y - mean) * view(prm.saturation))
    many = colour.sample((4000, 4, 8, 8), torch.Generator().manual_seed(0))
    for values, lo in ((many.brightness, -0.5), (many.contrast, 0.5), (many.saturation / 2, 0.0)):
        assert values.min() >= lo and values.max() <= lo + 1 and values.std().item() == pytest.approx(
            1 / math.sqrt(12), rel=0.05)
    with pytest.raises(ValueError, match="elatentlpips_release"):
        AdaAugment(["hue"], source="elatentlpips_release")
    with pytest.raises(ValueError, match="source"):
        AdaAugment(source="ada")


def test_filter_bank_splits_the_spectrum_and_adds_up_to_the_identity():
    bands = band_filters()
    assert bands.shape == (4, 43)
    identity = torch.zeros(43, dtype=torch.float64)
    identity[21] = 1
    torch.testing.assert_close(bands.sum(0), identity)
    torch.testing.assert_close(bands, bands.flip(1))  # zero phase
    n = torch.arange(43, dtype=torch.float64) - 21
    # each band passes (> 0.6) the middle of its octave and little (< 0.1) two octaves away
    middles = [math.pi / 16, 3 * math.pi / 16, 3 * math.pi / 8, 3 * math.pi / 4]
    response = torch.stack([(bands * torch.cos(w * n)).sum(1) for w in middles], 1)  # [band, frequency]
    assert (response.diagonal() > 0.6).all()
    assert response[0, 2:].abs().max() < 0.1 and response[3, :2].abs().max() < 0.1
    # the applied filter is a combination of the bands with ADA's gains
    x = latents(2, 4, 32, 32, seed=1)
    out, params = draw(["imgfilter"], x)
    gains = torch.linalg.lstsq(bands.T.float(), params.filter.T).solution.T
    assert (gains > 0).all() and out.shape == x.shape and (out - x).abs().max() > 1e-3


def test_band_gains_are_adas_product_of_per_band_normalisations():
    """ADA normalises the vector of each band's draw (1 elsewhere) by sqrt(sum_k P_k t_k^2) and
    multiplies: since sum P = 1 that is gain_k = d_k / prod_i sqrt(1 + (d_i^2 - 1) P_i). Equal draws
    a give that factor times the identity (0.9332 at a = 1.5), not the identity a normalisation of
    the whole vector would give."""
    power = torch.tensor([10, 1, 1, 1], dtype=torch.float64) / 13
    d = torch.exp2(torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    closed = d / torch.sqrt(1 + (d.square() - 1) * power).prod(1, keepdim=True)
    torch.testing.assert_close(band_gains(d), closed)
    equal = band_gains(torch.full((1, 4), 1.5, dtype=torch.float64))
    factor = 1.5 / math.sqrt((1 + 1.25 * 10 / 13) * (1 + 1.25 / 13) ** 3)
    torch.testing.assert_close(equal, torch.full((1, 4), factor, dtype=torch.float64))
    assert factor == pytest.approx(0.9332, abs=1e-4)
    once = d / (d.square() * power).sum(1, keepdim=True).sqrt()
    assert (band_gains(d) - once).abs().max() > 0.01


def test_noise_and_cutout():
    x = latents(8, 4, 32, 32, seed=1)
    out, params = draw(["noise", "cutout"], x)
    mask = params.cutout
    torch.testing.assert_close(out, (x + params.noise) * mask)
    # cutout: a 16x16 square (half the size) at a random centre, clipped at the border, channel-shared
    cut = (1 - mask).sum((1, 2, 3))
    assert (cut <= 256).all() and (cut > 0).all() and mask.shape == (8, 1, 32, 32)
    rows, cols = (1 - mask).amax(3).sum((1, 2)), (1 - mask).amax(2).sum((1, 2))
    torch.testing.assert_close(cut, rows * cols)
    sigma = params.noise.std((1, 2, 3))
    assert (sigma < 0.5).all()


def test_probability_zero_is_the_identity_up_to_resampling():
    x = latents(2, 4, 32, 32, seed=1)
    out, _ = draw("bgcfnc", x, p=0.0)
    assert (out - x).abs().max() < 1e-4
