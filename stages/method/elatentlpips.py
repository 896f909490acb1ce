"""E-LatentLPIPS (Kang et al. 2024, Diffusion2GAN), the CMT distance on ImageNet-512 latents: LPIPS
computed directly on 4x64x64 SD-VAE latents by a VGG16 trained on them, ensembled over random ADA
augmentations, so no VAE decoding is needed.

- `LatentVGG16`: VGG16 for 4-channel latents with GroupNorm(32) after every conv and the first two
  max-pools removed (config 64,64,128,128,256,256,256,M,512,512,512,M,512,512,512), so a 64x64 latent
  keeps its resolution through the first seven convs; with torchvision's VGG classifier head (7x7
  average pool, two 4096-wide layers with dropout, 1000 classes) for training it as an ImageNet
  classifier on the encoded latents.
- `ELatentLPIPS`: the distance over five feature slices of the conv-GN-ReLU stack, each feature
  vector scaled to unit length over channels, squared differences summed over channels (no learned
  heads), averaged over space and summed over the slices; both inputs first pass through one draw
  of the ADA augmentation (stages/method/ada_augment.py, preset "bgcfnc", p = 1, in the version of
  sony/cmt's preset or of the E-LatentLPIPS release: `source`).

The slices are module-index ranges [0:6], [6:12], [12:21], [21:31], [31:41] of `features`: every conv
brings three modules (conv, GroupNorm, ReLU) and each 'M' one, so the ranges end at the ReLUs of
convs 2, 4, 7, 10 and 13, i.e. LPIPS' relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (the two
max-pools open slices 4 and 5, at indices 21 and 31). `feature_slices` derives them from the layer
list rather than trusting the numbers.
"""

import torch
from torch import nn

from stages.method.ada_augment import AdaAugment

VGG16_LATENT = (64, 64, 128, 128, 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
SLICE_ENDS = (2, 4, 7, 10, 13)  # the slices end at the ReLU of these convs (1-based): relu1_2 ... relu5_3


class LatentVGG16(nn.Module):
    """The latent VGG16 classifier. `width` scales every channel count (1 in the paper; tests use
    tiny widths with fewer GroupNorm `groups`); `hidden` and `pool` size the classifier head."""

    def __init__(self, in_channels=4, num_classes=1000, width=1.0, groups=32, hidden=4096, pool=7, dropout=0.5):
        super().__init__()
        layers, channels = [], in_channels
        for v in VGG16_LATENT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out = round(v * width)
            if out % groups:
                raise ValueError(f"LatentVGG16: {out} channels (width {width}) do not split into {groups} groups")
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(groups, out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(
            nn.Linear(channels * pool * pool, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def feature_slices(features):
    """(start, end) module ranges of the five LPIPS slices, found from the conv positions."""
    convs = [i for i, layer in enumerate(features) if isinstance(layer, nn.Conv2d)]
    bounds, start = [], 0
    for k in SLICE_ENDS:
        end = convs[k - 1] + 3  # past the conv's GroupNorm and ReLU
        if not isinstance(features[end - 1], nn.ReLU):
            raise ValueError(f"feature slice ending at module {end} does not end with a ReLU: {features[end - 1]}")
        bounds.append((start, end))
        start = end
    return bounds


def unit_normalize(f, eps=1e-8):
    # f / sqrt(|f|^2 + eps), eps 1e-8, as the official `normalize_tensor` (sony/cmt's
    # elatentlpips/models.py): the eps inside the root keeps the gradient finite where a feature
    # vector is all zeros (ReLU), where LPIPS' f / (|f| + eps) would give NaN.
    return f * torch.rsqrt(f.square().sum(1, keepdim=True) + eps)


class ELatentLPIPS(nn.Module):
    """d(x, y) -> [B] for latents [B, 4, H, W]; the backbone is frozen and always in eval mode.
    `augment` None turns the ensembling off (plain LatentLPIPS without heads); `source` picks whose
    version of the augmentation runs (ada_augment.SOURCES, midtrain.elatentlpips_augment)."""

    def __init__(self, backbone: LatentVGG16, augment="bgcfnc", p=1.0, source="sony_cmt"):
        super().__init__()
        self.slices = nn.ModuleList(backbone.features[a:b] for a, b in feature_slices(backbone.features))
        self.augment = AdaAugment(augment, p, source) if augment is not None else None
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path, architecture=None, **kwargs):
        """From a LatentVGG16 state dict in a safetensors file (the head's weights may be there or not):
        a model file of train_latent_vgg holds it under `net.`, a bare state dict (and train_latent_vgg's
        files of format cmt-latent-vgg/1) under its own names."""
        from safetensors.torch import load_file

        backbone = LatentVGG16(**(architecture or {}))
        tensors = load_file(str(path))
        if any(k.startswith("net.") for k in tensors):
            tensors = {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}
        state = {k: v for k, v in tensors.items() if k.startswith("features.")}
        try:
            missing, unexpected = backbone.load_state_dict(state, strict=False)
            problem = [k for k in missing if k.startswith("features.")] + unexpected
        except RuntimeError as e:  # a tensor of another shape
            problem = str(e).splitlines()[1:3]
        if problem:
            raise ValueError(f"{path}: not the latent VGG16 of architecture {architecture or {}} ({problem[:3]}); "
                             "train it with train_latent_vgg or pass its architecture")
        return cls(backbone, **kwargs)

    def train(self, mode=True):
        return super().train(False)

    def features(self, x):
        out = []
        for block in self.slices:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x, y, generator=None):
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"E-LatentLPIPS compares two latent batches [B, C, H, W] of one shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.augment is not None:
            x, y = self.augment(x, y, generator=generator)
        # one backbone pass for both (GroupNorm is per sample, so the halves do not mix)
        features = self.features(torch.cat([x, y]))
        distance = 0
        for f in features:
            fx, fy = unit_normalize(f).chunk(2)
            distance = distance + (fx - fy).square().sum(1).mean((1, 2))
        return distance
