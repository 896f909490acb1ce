"""ADA's resampling of a geometric augmentation (Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data", appendix B): the image is padded by reflection, upsampled 2x with an
orthogonal wavelet low-pass filter (sym6), warped by the affine map with bilinear interpolation on
that finer grid, and downsampled 2x with the same filter. Sampling at twice the resolution through a
proper low-pass keeps the warp from aliasing; the reflection stands in for the image outside.

Written from that description as one formula per function (along each axis, separably):

- sym6: the 12-tap symlet low-pass h (Daubechies' least-asymmetric orthonormal wavelet with six
  vanishing moments), sum h = sqrt(2), sum_n h[n] h[n + 2k] = delta_k.
- grid: fine sample j sits at input position j / 2 (pixel centres at integers). sym6 is not
  symmetric: its centre, sum_n n h[n] / sum_n h[n] = 5.10 taps, makes the synthesis below put input
  sample u on fine sample 2u (0.1 fine samples off), where a symmetric 12-tap filter would sit
  between two fine samples.
- upsample2x (synthesis): up[j] = sqrt(2) sum_u x[u] h[j + 5 - 2u], zero outside the image.
- downsample2x (analysis, its adjoint): down[i] = (1 / sqrt(2)) sum_j z[j] h[j + 5 - 2i].
  Orthonormality makes downsample2x(upsample2x(x)) = x exactly, so the identity warp, and any warp
  that moves the fine grid onto itself by whole pixels (integer translations), are exact; a flip
  or quarter turn reverses the filter, which sym6 (nearly but not exactly symmetric) undoes only
  approximately (as in ADA, whose blits take the same path).
- margins: the input is padded so that the four output corners, mapped back into the input, lie at
  least 6 pixels (the filters' reach) inside it, at most size - 1 a side (what reflection allows);
  one margin for the whole batch.
- the warped fine grid covers the output and 5 fine samples beyond each border, what downsample2x
  reads; bilinear samples outside the padded image are 0.

The numbers agree with the NVlabs implementation run in a scratch folder outside this repository
(tests/test_ada_resample.py pins a case).
"""

import math

import torch
import torch.nn.functional as F

# sym6 decomposition low-pass (PyWavelets `pywt.Wavelet("sym6").dec_lo`, the filter ADA names)
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
REACH = 6        # input pixels a filter reaches: 12 taps on the fine grid
FINE_BEYOND = 5  # fine samples downsample2x reads beyond each border


def _taps(x, scale):
    return (torch.tensor(SYM6, dtype=torch.float64) * scale).to(x.dtype).to(x.device)


def _along(x, kernel, axis, transpose):
    """Depthwise 1-D filtering of [B, C, H, W] along H (axis 2) or W (axis 3) with stride 2."""
    c = x.shape[1]
    shape = (1, 1, kernel.numel(), 1) if axis == 2 else (1, 1, 1, kernel.numel())
    weight = kernel.reshape(shape).expand(c, -1, -1, -1)
    stride = (2, 1) if axis == 2 else (1, 2)
    if transpose:
        padding = (FINE_BEYOND, 0) if axis == 2 else (0, FINE_BEYOND)
        return F.conv_transpose2d(x, weight, stride=stride, padding=padding, groups=c)
    return F.conv2d(x, weight, stride=stride, groups=c)


def upsample2x(x):
    """[B, C, H, W] -> [B, C, 2H, 2W]: up[j] = sqrt(2) sum_u x[u] h[j + 5 - 2u] along each axis."""
    h = _taps(x, math.sqrt(2))
    return _along(_along(x, h, 2, True), h, 3, True)


def downsample2x(z):
    """[B, C, 2H + 10, 2W + 10] (the fine grid of an H x W image and 5 samples beyond each border)
    -> [B, C, H, W]: down[i] = (1 / sqrt(2)) sum_j z[j] h[j + 5 - 2i] along each axis."""
    h = _taps(z, 1 / math.sqrt(2))
    return _along(_along(z, h, 2, False), h, 3, False)


def margins(inverse, height, width):
    """Reflection padding (left, right, top, bottom) so that the output corners mapped back by
    `inverse` [B, 3, 3] (output pixel -> input pixel) lie REACH pixels inside, at most size - 1."""
    corners = torch.tensor([[0, 0, 1], [width - 1, 0, 1], [width - 1, height - 1, 1], [0, height - 1, 1]],
                           dtype=inverse.dtype, device=inverse.device)
    q = (inverse @ corners.T)[:, :2]  # [B, xy, corner]
    lo, hi = q.amin((0, 2)), q.amax((0, 2))
    need = torch.stack([REACH - lo[0], hi[0] - (width - 1) + REACH, REACH - lo[1], hi[1] - (height - 1) + REACH])
    limit = torch.tensor([width - 1, width - 1, height - 1, height - 1], dtype=need.dtype, device=need.device)
    return [int(v) for v in torch.minimum(need.clamp(min=0), limit).ceil().tolist()]


def warp(x, geometry):
    """x [B, C, H, W] warped by `geometry` [B, 3, 3], the affine map from input to output pixel
    coordinates (pixel centres at integers), with ADA's resampling."""
    b, _, height, width = x.shape
    inverse = torch.linalg.inv(geometry.to(torch.float64))
    left, right, top, bottom = margins(inverse, height, width)
    fine = upsample2x(F.pad(x, (left, right, top, bottom), mode="reflect"))

    # output fine samples j = -5 ... 2H + 4 at output pixel positions j / 2
    def positions(n):
        return torch.arange(-FINE_BEYOND, 2 * n + FINE_BEYOND, dtype=torch.float64, device=x.device) / 2

    py, px = torch.meshgrid(positions(height), positions(width), indexing="ij")
    out = torch.stack([px, py, torch.ones_like(px)], -1).reshape(-1, 3)  # [N, 3]
    src = (inverse.to(x.device) @ out.T)[:, :2]  # [B, xy, N], input pixel coordinates
    # input position u of the padded image is fine position 2u; grid_sample's normalised
    # coordinate of fine position f (align_corners False) is (2f + 1) / size - 1
    offset = torch.tensor([left, top], dtype=torch.float64, device=x.device).reshape(1, 2, 1)
    size = torch.tensor([fine.shape[3], fine.shape[2]], dtype=torch.float64, device=x.device).reshape(1, 2, 1)
    grid = (4 * (src + offset) + 1) / size - 1
    grid = grid.transpose(1, 2).reshape(b, 2 * height + 2 * FINE_BEYOND, 2 * width + 2 * FINE_BEYOND, 2)
    z = F.grid_sample(fine, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return downsample2x(z)
