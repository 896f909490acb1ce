"""ADA's augmentation pipeline (Karras et al. 2020, "Training Generative Adversarial Networks with
Limited Data", appendix B) for latents, the "E" of E-LatentLPIPS: both inputs of the distance pass
through one random draw of it, so the distance is an average over random views of the same pair.

Written from the paper's description. Each transformation is applied with probability p
(E-LatentLPIPS: p = 1), with the paper's distributions:

- pixel blitting: x-flip (i ~ U{0, 1}), 90-degree rotation (i ~ U{0, 3}), integer translation
  (t ~ U(-0.125, 0.125)^2 of the size, rounded to whole pixels);
- general geometric: isotropic scale (lognormal, log2-std 0.2), arbitrary rotation before and after
  an anisotropic scale (each with probability 1 - sqrt(1 - p), angle ~ U(-pi, pi); anisotropic
  log2-std 0.2), fractional translation (N(0, 0.125^2) of the size). All of them make one affine
  map, applied with ADA's resampling (stages/method/ada_resample.py: reflection padding, 2x sym6
  upsampling, bilinear warp, 2x sym6 downsampling), the blits included, as in ADA;
- colour: brightness (b ~ N(0, 0.2^2), added), contrast (log2-std 0.5, multiplied), luma flip
  (i ~ U{0, 1}: reflection through the plane orthogonal to the luma axis), hue rotation (angle ~
  U(-pi, pi) about the luma axis), saturation (log2-std 1, scaling the deviation from the luma
  axis), composed into one affine map of the colour vector in that order;
- image-space filtering: four frequency bands ([0, pi/8], [pi/8, pi/4], [pi/4, pi/2], [pi/2, pi]),
  each amplified with probability p by a gain of log2-std 1, the gain vector (that band's gain, 1
  elsewhere) normalised so that a 1/f spectrum (expected power [10, 1, 1, 1] / 13) keeps its
  power, and the four normalised vectors multiplied;
- corruptions: additive Gaussian noise (sigma ~ |N(0, 0.1^2)|) and cutout (a square of half the
  size, centre uniform, set to 0).

Colour on C-channel latents: ADA defines its colour operations on RGB, with the luma axis
v = (1, 1, 1) / sqrt(3). Here v = (1, ..., 1) / sqrt(C): brightness adds b to every channel, saturation
scales the part orthogonal to v, the luma flip is the reflection I - 2 v v^T, and the hue rotation
turns the plane of u1 = (1, -1, 0, ...) / sqrt(2) and u2 = (1, 1, -2, 0, ...) / sqrt(6) (both
orthogonal to v) by the angle, leaving v and the rest fixed. For C = 3 that is ADA's rotation about v;
for the 4-channel latents it is ASSUMED: the rotation about an axis is not unique in 4-D, and the
file sony/cmt imports for these operations is not released.

Two sources of the operation set (`source`, the config key midtrain.elatentlpips_augment):
- `sony_cmt`: the preset sony/cmt's ImageNet-512 code passes, "bgcfnc" with luma flip, hue rotation
  and the image filter, each as ADA defines it (above);
- `elatentlpips_release`: what the E-LatentLPIPS authors' released `ada_aug.py` (mingukkang/
  elatentlpips) implements of that preset: no luma flip, hue rotation or image filter, and colour
  operations of its own, drawn for every sample without ADA's probability gate: brightness
  + U(-0.5, 0.5), contrast about the sample's mean over all its values by a factor U(0.5, 1.5),
  saturation about the channel mean by a factor U(0, 2). Blits, geometry, noise and cutout as ADA.
sony/cmt's preset names operations that release does not have, so its code used another file.
"""

import dataclasses
import math

import torch
from kornia.filters import filter2d_separable
from torch import nn

from stages.method.ada_resample import warp

BLIT = ("xflip", "rotate90", "xint")
GEOMETRIC = ("scale", "rotate", "aniso", "xfrac")
COLOUR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
OPS = BLIT + GEOMETRIC + COLOUR + ("imgfilter", "noise", "cutout")
PIPELINES = {"bgcfnc": OPS, "bg": BLIT + GEOMETRIC, "bgc": BLIT + GEOMETRIC + COLOUR}
# what each source implements (module docstring)
SOURCES = {"sony_cmt": OPS,
           "elatentlpips_release": BLIT + GEOMETRIC + ("brightness", "contrast", "saturation", "noise", "cutout")}

# The paper's spreads (ADA appendix B, Table 5 defaults).
XINT_MAX = 0.125
SCALE_STD = 0.2      # log2
ROTATE_MAX = 1.0     # fraction of a half turn either way
ANISO_STD = 0.2      # log2
XFRAC_STD = 0.125
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5   # log2
HUE_MAX = 1.0        # fraction of a half turn either way
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


def band_gains(draws, power=EXPECTED_POWER):
    """ADA's gain per band from the drawn amplifications [B, 4]: for each band i the vector t with
    t_i = draw, 1 elsewhere, divided by sqrt(sum_k power_k t_k^2) (the 1/f spectrum keeps its
    power), and the four vectors multiplied. Equal draws a give a / prod_i sqrt(1 + (a^2 - 1) power_i)
    in every band: 0.933 of the identity at a = 1.5, the identity only at a = 1."""
    power = torch.as_tensor(power, dtype=draws.dtype, device=draws.device)
    gains = torch.ones_like(draws)
    for i in range(draws.shape[1]):
        t = torch.ones_like(draws)
        t[:, i] = draws[:, i]
        gains = gains * t / (power * t.square()).sum(1, keepdim=True).sqrt()
    return gains


def colour_matrix(brightness, contrast, lumaflip, hue, saturation, channels):
    """ADA's colour transformation of C-channel vectors as a [B, C + 1, C + 1] matrix on (x, 1):
    saturation @ hue @ luma flip @ contrast @ brightness (module docstring); None draws are left out."""
    draws = [d for d in (brightness, contrast, lumaflip, hue, saturation) if d is not None]
    b, c = draws[0].shape[0], channels
    kw = dict(dtype=torch.float64, device=draws[0].device)
    v = torch.full((c, 1), 1 / math.sqrt(c), **kw)
    vvt = v @ v.T
    eye = torch.eye(c + 1, **kw).expand(b, c + 1, c + 1)

    def linear(block):  # [B, C, C] -> [B, C + 1, C + 1]
        out = eye.clone()
        out[:, :c, :c] = block
        return out

    m = eye
    if brightness is not None:
        step = eye.clone()
        step[:, :c, c] = brightness.double().reshape(b, 1)
        m = step @ m
    if contrast is not None:
        m = linear(contrast.double().reshape(b, 1, 1) * torch.eye(c, **kw)) @ m
    if lumaflip is not None:
        m = linear(torch.eye(c, **kw) - 2 * vvt * lumaflip.double().reshape(b, 1, 1)) @ m
    if hue is not None:
        if c < 3:
            raise ValueError(f"hue rotation needs at least 3 channels (the plane orthogonal to the luma axis), got {c}")
        u1 = torch.zeros(c, 1, **kw)
        u1[:2, 0] = torch.tensor([1.0, -1.0], **kw) / math.sqrt(2)
        u2 = torch.zeros(c, 1, **kw)
        u2[:3, 0] = torch.tensor([1.0, 1.0, -2.0], **kw) / math.sqrt(6)
        theta = hue.double().reshape(b, 1, 1)
        plane, turn = u1 @ u1.T + u2 @ u2.T, u2 @ u1.T - u1 @ u2.T
        m = linear(torch.eye(c, **kw) + (theta.cos() - 1) * plane + theta.sin() * turn) @ m
    if saturation is not None:
        m = linear(vvt + (torch.eye(c, **kw) - vvt) * saturation.double().reshape(b, 1, 1)) @ m
    return m


@dataclasses.dataclass
class AugmentParams:
    """One random draw of the pipeline for a batch; None where an operation is off."""
    geometry: torch.Tensor | None     # [B, 3, 3] forward affine map in pixel coordinates (input -> output)
    brightness: torch.Tensor | None   # [B] offset
    contrast: torch.Tensor | None     # [B] factor
    lumaflip: torch.Tensor | None     # [B] 0 or 1
    hue: torch.Tensor | None          # [B] angle
    saturation: torch.Tensor | None   # [B] factor
    filter: torch.Tensor | None       # [B, 43] 1-D kernel, applied along x and y
    noise: torch.Tensor | None        # [B, C, H, W] (sigma already multiplied in)
    cutout: torch.Tensor | None       # [B, 1, H, W] mask of 0 (cut) and 1

    def to(self, device):
        return AugmentParams(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in dataclasses.fields(self)})


class AdaAugment(nn.Module):
    """`ops`: the operations to use (names in OPS or a PIPELINES key); `p`: ADA's strength; `source`:
    a SOURCES key (module docstring). A pipeline name keeps the operations its source implements;
    an explicit list must name only those.

    `sample` draws the parameters, `apply` applies a draw, and calling the module applies one draw to
    every tensor given, so `a, b = augment(x, y)` transforms x and y identically.
    """

    def __init__(self, ops="bgcfnc", p=1.0, source="sony_cmt"):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"augmentation source {source!r}; known: {sorted(SOURCES)} "
                             "(midtrain.elatentlpips_augment)")
        if isinstance(ops, str):
            if ops not in PIPELINES:
                raise ValueError(f"unknown augmentation pipeline {ops!r}; known: {sorted(PIPELINES)}")
            ops = tuple(op for op in PIPELINES[ops] if op in SOURCES[source])
        unknown = sorted(set(ops) - set(SOURCES[source]))
        if unknown:
            raise ValueError(f"augmentation {unknown} is not among what source {source} implements: "
                             f"{list(SOURCES[source])}")
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")
        self.ops, self.p, self.source = set(ops), float(p), source
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
            centre = _translate(torch.full((b,), (w - 1) / 2, device=device),
                                torch.full((b,), (h - 1) / 2, device=device))
            geometry = centre @ g @ torch.linalg.inv(centre)  # the maps above act about the image centre

        colour = dict.fromkeys(COLOUR)
        if self.source == "sony_cmt":
            draws = {"brightness": lambda: gate(torch.randn(b, **kw) * BRIGHTNESS_STD, p, 0),
                     "contrast": lambda: gate(lognormal(CONTRAST_STD), p, 1),
                     "lumaflip": lambda: gate(torch.randint(0, 2, (b,), **kw).float(), p, 0),
                     "hue": lambda: gate((torch.rand(b, **kw) * 2 - 1) * math.pi * HUE_MAX, p, 0),
                     "saturation": lambda: gate(lognormal(SATURATION_STD), p, 1)}
        else:  # the release's own forms, no gate
            draws = {"brightness": lambda: torch.rand(b, **kw) - 0.5,
                     "contrast": lambda: torch.rand(b, **kw) + 0.5,
                     "saturation": lambda: torch.rand(b, **kw) * 2}
        for name, draw in draws.items():
            if name in self.ops:
                colour[name] = draw()

        filt = None
        if "imgfilter" in self.ops:
            amplify = torch.stack([gate(lognormal(IMGFILTER_STD), p, 1) for _ in range(4)], 1)
            filt = band_gains(amplify) @ self.bands.to(device, torch.float32)

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

        return AugmentParams(geometry, **colour, filter=filt, noise=noise, cutout=cutout)

    def apply(self, x, params):
        """The transformed batch: geometry, colour, filter, noise, cutout, in ADA's order."""
        params = params.to(x.device)
        h, w = x.shape[-2:]
        if params.geometry is not None:
            x = warp(x, params.geometry)
        x = self.colour(x, params)
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

    def colour(self, x, params):
        draws = [params.brightness, params.contrast, params.lumaflip, params.hue, params.saturation]
        if all(d is None for d in draws):
            return x
        b, c = x.shape[:2]
        if self.source == "sony_cmt":
            m = colour_matrix(*draws, channels=c).to(x.dtype)
            return torch.einsum("bij,bjhw->bihw", m[:, :c, :c], x) + m[:, :c, c].reshape(b, c, 1, 1)
        factor = lambda d: d.to(x.dtype).reshape(b, 1, 1, 1)  # noqa: E731
        if params.brightness is not None:
            x = x + factor(params.brightness)
        if params.contrast is not None:
            mean = x.mean((1, 2, 3), keepdim=True)
            x = mean + (x - mean) * factor(params.contrast)
        if params.saturation is not None and c > 1:
            mean = x.mean(1, keepdim=True)
            x = mean + (x - mean) * factor(params.saturation)
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
    """Quarter turns with exact 0 and +-1 entries (cos(pi / 2) in float is not 0)."""
    i = i.long()
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=i.device)[i]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=i.device)[i]
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    return _matrix([[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]])


def _translate(tx, ty):
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    return _matrix([[one, zero, tx], [zero, one, ty], [zero, zero, one]])
