"""ADA's resampling of the geometric augmentation (stages/method/ada_resample.py): the sym6 filter
against its defining properties, the filter pair against its matrix form, the identity warp and
integer shifts exactly, a flip against its matrix form, a smooth image rotated against the rotated
formula, and values of the NVlabs implementation (stylegan2-ada-pytorch augment.py, run in a scratch
folder outside this repository) for a 30-degree rotation."""

import math

import torch
import torch.nn.functional as F

from stages.method import ada_resample as R

H = torch.tensor(R.SYM6, dtype=torch.float64)


def affine(a, b, c, d, tx, ty, batch=1):
    return torch.tensor([[a, b, tx], [c, d, ty], [0, 0, 1]], dtype=torch.float64).expand(batch, 3, 3)


def about_centre(m, size):
    c = (size - 1) / 2
    shift = torch.tensor([[1, 0, c], [0, 1, c], [0, 0, 1]], dtype=torch.float64)
    return shift @ m @ torch.linalg.inv(shift)


def test_sym6_is_an_orthonormal_low_pass_with_six_vanishing_moments():
    """sum h = sqrt 2; sum_n h[n] h[n + 2k] = delta_k; the wavelet g[n] = (-1)^n h[11 - n] has
    sum_n n^m g[n] = 0 for m < 6; and it is the least asymmetric of such filters' family (sym6,
    not db6: its centre 5.10 lies near the middle, db6's near the end)."""
    assert abs(H.sum().item() - math.sqrt(2)) < 1e-12
    for k in range(6):
        assert abs((H[: 12 - 2 * k] * H[2 * k:]).sum().item() - (k == 0)) < 1e-12
    n = torch.arange(12, dtype=torch.float64)
    g = (-1) ** n * H.flip(0)
    for m in range(6):
        assert abs((n**m * g).sum().item()) < 1e-7 * 11**m
    assert abs((n * H).sum().item() / H.sum().item() - 5.098) < 1e-3


def synthesis_matrix(n):
    """S [2n, n]: S[j, u] = sqrt(2) h[j + 5 - 2u] (zero outside the taps)."""
    s = torch.zeros(2 * n, n, dtype=torch.float64)
    for j in range(2 * n):
        for u in range(n):
            k = j + 5 - 2 * u
            if 0 <= k < 12:
                s[j, u] = math.sqrt(2) * H[k]
    return s


def test_the_filter_pair_is_its_matrix_form_and_analysis_undoes_synthesis():
    x = torch.randn(1, 1, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    up = R.upsample2x(x)
    torch.testing.assert_close(up[0, 0], synthesis_matrix(7) @ x[0, 0] @ synthesis_matrix(9).T)
    # the analysis reads 5 fine samples beyond each border, where upsample2x stops: pixels 3 and
    # more inside read only samples it made
    back = R.downsample2x(F.pad(up, (5, 5, 5, 5)))
    torch.testing.assert_close(back[..., 3:-3, 3:-3], x[..., 3:-3, 3:-3], rtol=0, atol=1e-11)
    assert (back - x).abs().max() > 0.01


def test_identity_warp_returns_the_input():
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(R.warp(x, affine(1, 0, 0, 1, 0, 0, 2)), x, rtol=0, atol=1e-5)


def test_integer_shift_is_the_pixel_shift_with_reflection_at_the_borders():
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = R.warp(x, affine(1, 0, 0, 1, 3, -2, 2))  # content moves 3 right, 2 up
    # out[y, x] = in[y + 2, x - 3], the input reflected (no edge repeat) beyond its borders
    want = F.pad(x, (3, 0, 0, 2), mode="reflect")[:, :, 2:, :16]
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)


def analysis_matrix(n):
    """A [n, 2n + 10] over fine samples j = -5 ... 2n + 4: A[i, j + 5] = h[j + 5 - 2i] / sqrt(2)."""
    a = torch.zeros(n, 2 * n + 10, dtype=torch.float64)
    for i in range(n):
        a[i, 2 * i:2 * i + 12] = H / math.sqrt(2)
    return a


def test_a_flip_is_its_matrix_form_and_only_nearly_the_pixel_flip():
    """x -> 15 - x on 16 x 16: the margins are 6 on every side; with the reflected image P, the
    fine image is U = S P S^T; output fine sample (j_y, j_x) (positions j / 2) reads U at
    (j_y + 12, 42 - j_x), whole fine samples, so bilinear takes them as they are; the output is
    A z A^T. sym6 is not symmetric (its centre 0.05 pixels off the one the grid assumes), so this
    is the pixel flip only up to a 0.1-pixel shift, and far from it on white noise (as in ADA, whose
    blits take this path)."""
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = R.warp(x, affine(-1, 0, 0, 1, 15, 0))
    padded = F.pad(x, (6, 6, 6, 6), mode="reflect")[0, 0]
    fine = synthesis_matrix(28) @ padded @ synthesis_matrix(28).T  # [56, 56]
    j = torch.arange(-5, 37)
    z = fine[(j + 12)[:, None], (42 - j)[None, :]]
    want = analysis_matrix(16) @ z @ analysis_matrix(16).T
    torch.testing.assert_close(out[0, 0], want, rtol=0, atol=1e-10)
    assert (out[0, 0] - x[0, 0].flip(-1)).abs().max() > 0.05
    smooth = torch.cos(0.3 * torch.arange(16, dtype=torch.float64)).expand(1, 1, 16, 16)
    assert (R.warp(smooth, affine(-1, 0, 0, 1, 15, 0)) - smooth.flip(-1)).abs().max() < 0.3 * 0.12


def test_a_smooth_image_rotates_like_its_formula():
    """cos(w . p) rotated by 30 degrees about the centre is cos(w . R^-1 (p - c) + w . c) away from
    the borders, up to the resampling's error at this low frequency."""
    n = 32
    c = (n - 1) / 2
    coords = torch.arange(n, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    w = (0.35, -0.2)
    image = torch.cos(w[0] * xx + w[1] * yy)[None, None]
    t = math.pi / 6
    out = R.warp(image, about_centre(affine(math.cos(t), -math.sin(t), math.sin(t), math.cos(t), 0, 0), n))
    # the source of output p is R^-1 (p - c) + c
    sx = math.cos(t) * (xx - c) + math.sin(t) * (yy - c) + c
    sy = -math.sin(t) * (xx - c) + math.cos(t) * (yy - c) + c
    want = torch.cos(w[0] * sx + w[1] * sy)
    inner = (slice(8, 24), slice(8, 24))
    assert (out[0, 0][inner] - want[inner]).abs().max() < 0.02
    assert (out[0, 0][inner] - image[0, 0][inner]).abs().max() > 0.5  # it did rotate


def test_values_of_the_nvlabs_implementation_for_a_rotation():
    """ADA's AugmentPipe(rotate=1) at debug_percentile 7/12 (pre-rotation by pi/6 in its inverse
    map: the content turns by -30 degrees) on sin(0.7 y + 1.3 x), cos(0.4 y - 0.9 x) at 16 x 16,
    read at a few pixels, borders included."""
    n = 16
    coords = torch.arange(n, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    x = torch.stack([torch.sin(0.7 * yy + 1.3 * xx), torch.cos(0.4 * yy - 0.9 * xx)])[None]
    t = -math.pi / 6
    out = R.warp(x, about_centre(affine(math.cos(t), -math.sin(t), math.sin(t), math.cos(t), 0, 0), n))
    official = {(0, 7, 7): 0.948813, (0, 0, 0): 0.916845, (1, 3, 12): -0.892633, (1, 15, 2): -0.892152,
                (0, 10, 5): -0.942949}
    for (ch, row, col), value in official.items():
        assert abs(out[0, ch, row, col].item() - value) < 2e-5, (ch, row, col)
