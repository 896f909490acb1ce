"""ADA's augmentation pipeline (Karras et al. 2020, "Training Generative Adversarial Networks with
Limited Data", appendix B) for latents, the "E" of E-LatentLPIPS: both inputs of the distance pass
through one random draw of it, so the distance is an average over random views of the same pair.

Written from the paper's description; kornia does the resampling (`warp_affine`) and the separable
filtering (`filter2d_separable`). Each transformation is applied with probability p (E-LatentLPIPS:
p = 1), with the paper's distributions:

- pixel blitting: x-flip (i ~ U{0, 1}), 90-degree rotation (i ~ U{0, 3}), integer translation
  (t ~ U(-0.125, 0.125)^2 of the size, rounded to whole pixels);
- general geometric: isotropic scale (lognormal, log2-std 0.2), arbitrary rotation before and after
  an anisotropic scale (each with probability 1 - sqrt(1 - p), angle ~ U(-pi, pi); anisotropic
  log2-std 0.2), fractional translation (N(0, 0.125^2) of the size);
- colour: brightness (b ~ N(0, 0.2^2), added), contrast (log2-std 0.5, multiplied), saturation
  (log2-std 1, scaling each pixel's deviation from its mean over channels);
- image-space filtering: four frequency bands ([0, pi/8], [pi/8, pi/4], [pi/4, pi/2], [pi/2, pi])
  amplified by gains of log2-std 1, renormalised so that a 1/f spectrum (expected power
  [10, 1, 1, 1] / 13) keeps its power;
- corruptions: additive Gaussian noise (sigma ~ |N(0, 0.1^2)|) and cutout (a square of half the
  size, centre uniform, set to 0).

On 4-channel latents ADA's luma flip and hue rotation are left out: both are defined by the RGB luma
axis (1, 1, 1) / sqrt(3), the hue rotation as a 3-D rotation about it, and latent channels are not
colour channels (a rotation about an axis does not even exist in 4-D). Brightness, contrast and
saturation need no colour space: an offset, a gain, and a gain on the deviation from the channel
mean. The E-LatentLPIPS authors' own public release keeps the same three for latents.

Simplification: ADA resamples its geometric warp at twice the resolution through a wavelet low-pass
to limit aliasing; here the combined warp is one bilinear `warp_affine` with reflection padding. Blit
operations map pixel centres onto pixel centres, so on their own they stay exact.
"""

import dataclasses
import math

import torch
from kornia.filters import filter2d_separable
from kornia.geometry.transform import warp_affine
from torch import nn

BLIT = ("xflip", "rotate90", "xint")
GEOMETRIC = ("scale", "rotate", "aniso", "xfrac")
COLOUR = ("brightness", "contrast", "saturation")
OPS = BLIT + GEOMETRIC + COLOUR + ("imgfilter", "noise", "cutout")
PIPELINES = {"bgcfnc": OPS, "bg": BLIT + GEOMETRIC, "bgc": BLIT + GEOMETRIC + COLOUR}

# The paper's spreads (ADA appendix B, Table 5 defaults).
XINT_MAX = 0.125
SCALE_STD = 0.2      # log2
ROTATE_MAX = 1.0     # fraction of a half turn either way
ANISO_STD = 0.2      # log2
XFRAC_STD = 0.125
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5   # log2
SATURATION_STD = 1.0  # log2
IMGFILTER_STD = 1.0  # log2
NOISE_STD = 0.1
CUTOUT_SIZE = 0.5
EXPECTED_POWER = (10 / 13, 1 / 13, 1 / 13, 1 / 13)  # per band, lowest first: a 1/f spectrum


def band_filters(dtype=torch.float64):
    """The four zero-phase 1-D band-pass filters [4, 43], lowest band first, that add up to the identity.

    From the orthonormal Daubechies-2 (= Symlet-2) low-pass h: P(w) = |H(w)|^2 / 2 is a zero-phase
    half-band low-pass with P(w) + P(w + pi) = 1, so Q(w) = P(w + pi) is its complementary high-pass.
    An undecimated dyadic tree splits [0, pi] at pi/2, pi/4, pi/8:
    Q(w), P(w)Q(2w), P(w)P(2w)Q(4w), P(w)P(2w)P(4w); they telescope to 1.
    """
    r3, norm = math.sqrt(3), 4 * math.sqrt(2)
    h = torch.tensor([1 + r3, 3 + r3, 3 - r3, 1 - r3], dtype=dtype) / norm  # sum sqrt(2), sum of squares 1
    low = torch.nn.functional.conv1d(h.reshape(1, 1, -1), h.reshape(1, 1, -1), padding=3).flatten() / 2  # h * h(-n)
    high = low * (-1) ** (torch.arange(7) - 3)

    def up(f, k):  # f(k w): k - 1 zeros between taps
        out = torch.zeros((f.numel() - 1) * k + 1, dtype=dtype)
        out[::k] = f
        return out

    def conv(*filters):
        out = filters[0]
        for f in filters[1:]:
            out = torch.nn.functional.conv1d(out.reshape(1, 1, -1), f.flip(0).reshape(1, 1, -1),
                                             padding=f.numel() - 1).flatten()
        return out

    bands = [conv(low, up(low, 2), up(low, 4)), conv(low, up(low, 2), up(high, 4)), conv(low, up(high, 2)), high]
    size = max(b.numel() for b in bands)
    return torch.stack([torch.nn.functional.pad(b, ((size - b.numel()) // 2,) * 2) for b in bands])


@dataclasses.dataclass
class AugmentParams:
    """One random draw of the pipeline for a batch; None where an operation is off."""
    geometry: torch.Tensor | None     # [B, 3, 3] forward affine map in pixel coordinates (input -> output)
    brightness: torch.Tensor | None   # [B, 1, 1, 1]
    contrast: torch.Tensor | None     # [B, 1, 1, 1]
    saturation: torch.Tensor | None   # [B, 1, 1, 1]
    filter: torch.Tensor | None       # [B, 43] 1-D kernel, applied along x and y
    noise: torch.Tensor | None        # [B, C, H, W] (sigma already multiplied in)
    cutout: torch.Tensor | None       # [B, 1, H, W] mask of 0 (cut) and 1

    def to(self, device):
        return AugmentParams(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in dataclasses.fields(self)})


class AdaAugment(nn.Module):
    """`ops`: the operations to use (names in OPS or a PIPELINES key); `p`: ADA's strength.

    `sample` draws the parameters, `apply` applies a draw, and calling the module applies one draw to
    every tensor given, so `a, b = augment(x, y)` transforms x and y identically.
    """

    def __init__(self, ops="bgcfnc", p=1.0):
        super().__init__()
        ops = PIPELINES[ops] if isinstance(ops, str) else tuple(ops)
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise ValueError(f"unknown augmentation {unknown}; known: {list(OPS)} (luma flip and hue rotation "
                             "are RGB operations, left out for latents)")
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")
        self.ops, self.p = set(ops), float(p)
        self.register_buffer("bands", band_filters().float(), persistent=False)

    def sample(self, shape, generator=None, device=None):
        """Parameters for a batch of `shape` [B, C, H, W], drawn from `generator` (on its device)."""
        b, c, h, w = shape
        device = generator.device if generator is not None else (device or self.bands.device)
        kw = dict(generator=generator, device=device)
        p = self.p

        def gate(values, prob, identity):  # each sample keeps its draw with probability prob
            keep = torch.rand(values.shape[:1], **kw).reshape(-1, *[1] * (values.ndim - 1)) < prob
            return torch.where(keep, values, torch.full_like(values, identity))

        def lognormal(std, size=(b,)):
            return torch.exp2(torch.randn(size, **kw) * std)

        eye = torch.eye(3, device=device).expand(b, 3, 3)
        g = eye
        if "xflip" in self.ops:
            i = gate(torch.randint(0, 2, (b,), **kw).float(), p, 0)
            g = _scale(1 - 2 * i, torch.ones_like(i)) @ g
        if "rotate90" in self.ops:
            i = gate(torch.randint(0, 4, (b,), **kw).float(), p, 0)
            g = _rotate90(i) @ g
        if "xint" in self.ops:
            t = gate((torch.rand(b, 2, **kw) * 2 - 1) * XINT_MAX, p, 0)
            g = _translate(torch.round(t[:, 0] * w), torch.round(t[:, 1] * h)) @ g
        if "scale" in self.ops:
            s = gate(lognormal(SCALE_STD), p, 1)
            g = _scale(s, s) @ g
        p_rot = 1 - math.sqrt(1 - p)  # pre- or post-rotation: P(either) = p
        if "rotate" in self.ops:
            g = _rotate(gate((torch.rand(b, **kw) * 2 - 1) * math.pi * ROTATE_MAX, p_rot, 0)) @ g
        if "aniso" in self.ops:
            s = gate(lognormal(ANISO_STD), p, 1)
            g = _scale(s, 1 / s) @ g
        if "rotate" in self.ops:
            g = _rotate(gate((torch.rand(b, **kw) * 2 - 1) * math.pi * ROTATE_MAX, p_rot, 0)) @ g
        if "xfrac" in self.ops:
            t = gate(torch.randn(b, 2, **kw) * XFRAC_STD, p, 0)
            g = _translate(t[:, 0] * w, t[:, 1] * h) @ g
        geometry = None
        if self.ops & set(BLIT + GEOMETRIC):
            centre = _translate(torch.full((b,), (w - 1) / 2, device=device), torch.full((b,), (h - 1) / 2, device=device))
            geometry = centre @ g @ torch.linalg.inv(centre)  # the maps above act about the image centre

        def colour(name, draw, identity):
            return gate(draw, p, identity).reshape(b, 1, 1, 1) if name in self.ops else None

        brightness = colour("brightness", torch.randn(b, **kw) * BRIGHTNESS_STD, 0)
        contrast = colour("contrast", lognormal(CONTRAST_STD), 1)
        saturation = colour("saturation", lognormal(SATURATION_STD), 1)

        filt = None
        if "imgfilter" in self.ops:
            gains = torch.ones(b, 4, device=device)
            for band in range(4):  # each band amplified with probability p
                gains[:, band] = gate(lognormal(IMGFILTER_STD), p, 1)
            power = torch.tensor(EXPECTED_POWER, device=device)
            gains = gains / (gains.square() * power).sum(1, keepdim=True).sqrt()
            filt = gains @ self.bands.to(device, torch.float32)

        noise = None
        if "noise" in self.ops:
            sigma = gate(torch.randn(b, **kw).abs() * NOISE_STD, p, 0).reshape(b, 1, 1, 1)
            noise = torch.randn(b, c, h, w, **kw) * sigma

        cutout = None
        if "cutout" in self.ops:
            size = gate(torch.full((b,), CUTOUT_SIZE, device=device), p, 0).reshape(b, 1, 1, 1)
            centre = torch.rand(b, 2, **kw).reshape(b, 2, 1, 1)
            xs = ((torch.arange(w, device=device) + 0.5) / w).reshape(1, 1, 1, w)
            ys = ((torch.arange(h, device=device) + 0.5) / h).reshape(1, 1, h, 1)
            inside = ((xs - centre[:, :1]).abs() < size / 2) & ((ys - centre[:, 1:]).abs() < size / 2)
            cutout = (~inside).float()

        return AugmentParams(geometry, brightness, contrast, saturation, filt, noise, cutout)

    def apply(self, x, params):
        """The transformed batch: geometry, colour, filter, noise, cutout, in ADA's order."""
        params = params.to(x.device)
        b, c, h, w = x.shape
        if params.geometry is not None:
            x = warp_affine(x, params.geometry[:, :2].to(x.dtype), (h, w), mode="bilinear",
                            padding_mode="reflection", align_corners=True)
        if params.brightness is not None:
            x = x + params.brightness
        if params.contrast is not None:
            x = x * params.contrast
        if params.saturation is not None:
            mean = x.mean(1, keepdim=True)
            x = mean + (x - mean) * params.saturation
        if params.filter is not None:
            if min(h, w) <= params.filter.shape[1] // 2:
                raise ValueError(f"the image-space filter needs images larger than {params.filter.shape[1] // 2} "
                                 f"pixels a side (reflection padding), got {h}x{w}; leave out 'imgfilter'")
            kernel = params.filter.to(x.dtype)
            x = filter2d_separable(x, kernel, kernel, border_type="reflect")
        if params.noise is not None:
            x = x + params.noise
        if params.cutout is not None:
            x = x * params.cutout
        return x

    def forward(self, *tensors, generator=None):
        shape = tensors[0].shape
        if any(t.shape != shape for t in tensors):
            raise ValueError(f"augmenting tensors of different shapes {[tuple(t.shape) for t in tensors]}")
        params = self.sample(shape, generator=generator, device=tensors[0].device)
        return tuple(self.apply(t, params) for t in tensors)


def _matrix(rows):
    return torch.stack([torch.stack(row, -1) for row in rows], -2)


def _scale(sx, sy):
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    return _matrix([[sx, zero, zero], [zero, sy, zero], [zero, zero, one]])


def _rotate(theta):
    cos, sin, zero, one = torch.cos(theta), torch.sin(theta), torch.zeros_like(theta), torch.ones_like(theta)
    return _matrix([[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]])


def _rotate90(i):
    """Quarter turns with exact 0 and +-1 entries (cos(pi / 2) in float is not 0: the blit would blur)."""
    i = i.long()
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=i.device)[i]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=i.device)[i]
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    return _matrix([[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]])


def _translate(tx, ty):
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    return _matrix([[one, zero, tx], [zero, one, ty], [zero, zero, one]])
