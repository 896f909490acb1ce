"""DDPM++: the official EDM checkpoint layout (names, shapes, counts) and the layers' arithmetic."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from stages import networks
from stages.networks.ddpmpp import Conv2d, NoiseEmbedding, UNetBlock
from stages.networks.precond import Precond

torch.set_num_threads(1)

CIFAR = {"kind": "ddpmpp", "in_channels": 3, "resolution": 32, "channels": 128, "channel_mult": [2, 2, 2],
         "num_blocks": 4, "attn_resolutions": [16], "augment_dim": 9}
SIXTY_FOUR = {**CIFAR, "resolution": 64, "channel_mult": [1, 2, 2, 2]}


def layout(arch):
    state = Precond(networks.build(arch)).state_dict()
    text = "\n".join(f"{name} {tuple(t.shape)}" for name, t in sorted(state.items()))
    return state, hashlib.sha256(text.encode()).hexdigest()


def test_cifar10_layout_matches_the_official_checkpoint():
    state, digest = layout(CIFAR)
    # Entry count derived by hand from the layout: mapping 5, encoder 176, decoder 244.
    assert len(state) == 425
    params = sum(t.numel() for name, t in state.items() if not name.endswith("resample_filter"))
    assert params == 55_733_891  # EDM's CIFAR-10 DDPM++ with the 9-d augmentation embedding: "55.7M"
    spot = {
        "model.map_augment.weight": (128, 9),
        "model.map_layer0.weight": (512, 128),
        "model.map_layer1.bias": (512,),
        "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.32x32_block0.conv0.weight": (256, 128, 3, 3),
        "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "model.enc.32x32_block0.affine.weight": (256, 512),
        "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "model.enc.16x16_down.skip.weight": (256, 256, 1, 1),
        "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "model.enc.16x16_block3.norm2.weight": (256,),
        "model.dec.8x8_in0.proj.weight": (256, 256, 1, 1),
        "model.dec.8x8_block0.conv0.weight": (256, 512, 3, 3),
        "model.dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2),
        "model.dec.16x16_block4.qkv.bias": (768,),
        "model.dec.32x32_block4.conv0.weight": (256, 384, 3, 3),  # 256 + the 128-channel input conv
        "model.dec.32x32_aux_norm.weight": (256,),
        "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    for name, shape in spot.items():
        assert tuple(state[name].shape) == shape, name
    for absent in ("model.dec.16x16_block3.qkv.weight", "model.enc.32x32_block0.qkv.weight",
                   "model.dec.8x8_in1.qkv.weight", "model.enc.8x8_block1.skip.weight"):
        assert absent not in state
    assert torch.equal(state["model.enc.8x8_down.skip.resample_filter"], torch.full((1, 1, 2, 2), 0.25))
    assert digest == "1c5f38fd273af62af825096853b87dee71422792d762bfca333c82b91c7f2878"


def test_64x64_layout():
    state, digest = layout(SIXTY_FOUR)
    assert len(state) == 553
    assert sum(t.numel() for n, t in state.items() if not n.endswith("resample_filter")) == 61_805_571
    assert tuple(state["model.enc.64x64_block0.conv0.weight"].shape) == (128, 128, 3, 3)
    assert "model.enc.64x64_block0.skip.weight" not in state  # 128 -> 128 at the first level
    assert tuple(state["model.dec.64x64_aux_conv.weight"].shape) == (3, 128, 3, 3)
    assert digest == "327e9abfb3a00b6167aa6357947718b23e93b0c30fca53a5647d5c65640a32a1"


def test_resampling_is_box_down_and_nearest_up():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    down, up = Conv2d(4, 4, 0, resample="down"), Conv2d(4, 4, 0, resample="up")
    assert torch.allclose(down(x), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.equal(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_noise_embedding_values():
    emb = NoiseEmbedding(8)(torch.tensor([0.0, 2.0]))
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert torch.allclose(emb[1], torch.cat([(2 * freqs).sin(), (2 * freqs).cos()]), atol=1e-6)


def test_attention_block_against_explicit_formula():
    torch.manual_seed(1)
    block = UNetBlock(8, 8, emb_channels=6, attention=True).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 6)
    got = block(x, emb)

    # the same block computed by hand: residual part, then single-head attention whose qkv
    # channels are interleaved (channel c of q, k, v at rows 3c, 3c+1, 3c+2)
    h = block.conv0(F.silu(block.norm0(x)))
    h = F.silu(block.norm1(h + block.affine(emb)[:, :, None, None]))
    h = (block.conv1(h) + x) / math.sqrt(2)
    qkv = block.qkv(block.norm2(h)).reshape(2, 8, 3, 16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    weights = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(8), dim=2)
    a = torch.einsum("bqk,bck->bcq", weights, v).reshape(2, 8, 4, 4)
    want = (block.proj(a) + h) / math.sqrt(2)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("arch", [CIFAR, SIXTY_FOUR])
def test_small_forward_runs_and_depends_on_noise(arch):
    small = {**arch, "channels": 16, "num_blocks": 1, "dropout": 0.0}
    torch.manual_seed(2)
    net = networks.build(small).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    res = arch["resolution"]
    x = torch.randn(2, 3, res, res)
    y0, y1 = net(x, torch.zeros(2)), net(x, torch.ones(2))
    assert y0.shape == x.shape and torch.isfinite(y0).all()
    assert not torch.allclose(y0, y1)


def test_augment_embedding_adds_exactly_zero_but_stays_in_the_graph():
    small = {**CIFAR, "channels": 16, "num_blocks": 1, "dropout": 0.0}
    torch.manual_seed(3)
    with_aug = networks.build(small)
    without = networks.build({**small, "augment_dim": 0})
    with torch.no_grad():
        for p in with_aug.parameters():
            p.normal_(0, 0.1)
    missing = without.load_state_dict(with_aug.state_dict(), strict=False)
    assert missing.unexpected_keys == ["map_augment.weight"] and not missing.missing_keys
    x, c = torch.randn(2, 3, 32, 32), torch.randn(2)
    out = with_aug(x, c)
    assert torch.equal(out, without(x, c))
    out.square().sum().backward()
    grad = with_aug.map_augment.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0  # DDP sees it used; it never moves
