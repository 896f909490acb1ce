"""The MeanFlow DiT: parameter counts against DiT's published ones, adaLN-Zero's identity start,
the two time inputs, the null class, the position table and the patch layout, the JVP MeanFlow
takes through it, and its place in the average-velocity wrapper and the model files."""

import math

import numpy as np
import pytest
import torch

from stages import networks
from stages.files import checkpoints
from stages.method import meanflow
from stages.networks.average_velocity import AverageVelocity

torch.set_num_threads(1)

TINY = {"kind": "dit", "resolution": 8, "in_channels": 4, "num_classes": 10, "patch_size": 2,
        "hidden_size": 32, "depth": 2, "num_heads": 2}


def tiny_dit(seed=0, perturb=True, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    net = networks.build({**TINY, **overrides}).to(dtype)
    if perturb:  # the zero-initialised modulations would make every time and label invisible
        with torch.no_grad():
            for prm in net.parameters():
                prm.add_(0.05 * torch.randn_like(prm))
    return net


def inputs(n=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=dtype)
    h = t * torch.rand(n, generator=g, dtype=dtype)
    return x, t, h, torch.randint(0, 10, (n,), generator=g)


# ----------------------------------------------------------------------------------------------
# Parameter counts


def count_by_hand(depth, hidden, patch, channels=4, classes=1000, resolution=32, freq=256,
                  out_channels=None, pos_param=False, time_embedders=1):
    """Closed form from the layer shapes (weights + biases)."""
    out_channels = out_channels or channels
    mlp = 4 * hidden
    block = (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden)  # qkv, proj
    block += (hidden * mlp + mlp) + (mlp * hidden + hidden)  # fc1, fc2
    block += hidden * 6 * hidden + 6 * hidden  # adaLN
    n = channels * patch * patch * hidden + hidden  # patch projection
    n += time_embedders * (freq * hidden + hidden + hidden * hidden + hidden)
    n += (classes + 1) * hidden + depth * block
    n += hidden * 2 * hidden + 2 * hidden + hidden * patch * patch * out_channels + patch * patch * out_channels
    if pos_param:
        n += (resolution // patch) ** 2 * hidden
    return n


def test_the_hand_count_reproduces_dits_published_counts():
    # DiT (learned sigma: 8 output channels; its fixed position table is a frozen nn.Parameter)
    assert count_by_hand(28, 1152, 2, out_channels=8, pos_param=True) == 675_129_632  # DiT-XL/2, "675M"
    assert count_by_hand(12, 768, 4, out_channels=8, pos_param=True) == 130_475_648  # DiT-B/4, "130M"


@pytest.mark.parametrize("preset, sizes, pinned", [
    ("MF-XL/2", (28, 1152, 2), 676_440_592),
    ("MF-B/4", (12, 768, 4), 131_165_248),
    ("MF-B/2", (12, 768, 2), 131_091_472),
    ("MF-L/2", (24, 1024, 2), 459_137_040),
    ("MF-XL/4", (28, 1152, 4), 676_551_232),
])
def test_parameter_counts_pinned(preset, sizes, pinned):
    with torch.device("meta"):
        net = networks.build({"kind": "dit", "preset": preset})
    got = sum(p.numel() for p in net.parameters())
    assert got == pinned
    assert got == count_by_hand(*sizes, time_embedders=2)
    assert not any(name == "pos_embed" for name, _ in net.named_parameters())


def test_difference_from_dit_is_the_second_time_embedder_sigma_and_position_table():
    # MF-XL/2 = DiT-XL/2 + the (t - r) embedder - the learned-sigma outputs - the frozen table
    second_embedder = 256 * 1152 + 1152 + 1152 * 1152 + 1152
    sigma_outputs = 1152 * 16 + 16
    position_table = 256 * 1152
    assert 675_129_632 + second_embedder - sigma_outputs - position_table == 676_440_592
    assert (second_embedder, sigma_outputs, position_table) == (1_624_320, 18_448, 294_912)


# ----------------------------------------------------------------------------------------------
# Initialisation


def test_zero_initialised_adaln_makes_every_block_the_identity():
    net = tiny_dit(perturb=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 32, generator=g, dtype=torch.float64)
    c = torch.randn(3, 32, generator=g, dtype=torch.float64)
    for block in net.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.equal(net.final_layer(x, c), torch.zeros(3, 16, 2 * 2 * 4, dtype=torch.float64))
    z, t, h, y = inputs()
    assert torch.equal(net(z, t, h, y), torch.zeros_like(z))
    # ... while the rest is not zero: DiT's xavier / N(0, 0.02) draws
    assert net.blocks[0].attn.qkv.weight.abs().max() > 0 and net.y_embedder.weight.std() > 0.01
    assert abs(net.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002


def test_a_trained_block_is_not_the_identity():
    # the identity above comes from the zero gates, not from a block that ignores its input
    net = tiny_dit()
    x = torch.randn(3, 16, 32, dtype=torch.float64)
    c = torch.randn(3, 32, dtype=torch.float64)
    assert not torch.allclose(net.blocks[0](x, c), x)


# ----------------------------------------------------------------------------------------------
# Conditioning


def test_output_depends_on_both_times_through_separate_embedders():
    net = tiny_dit().eval()
    z, t, h, y = inputs()
    out = net(z, t, h, y)
    assert not torch.allclose(out, net(z, t, h * 0.5, y))  # t - r matters
    assert not torch.allclose(out, net(z, t * 0.5, h, y))  # t matters
    assert not torch.allclose(out, net(z, h, t, y))  # the two times are not interchangeable
    assert not torch.allclose(out, net(z, t, h, (y + 1) % 10))  # the class matters
    # the conditioning is t-embedding + (t - r)-embedding + class embedding
    want = net.t_embedder(t) + net.h_embedder(h) + net.y_embedder.weight[y]
    torch.testing.assert_close(net.condition(t, h, y), want, rtol=0, atol=0)


def test_null_class_is_the_extra_last_row_of_the_class_table():
    net = tiny_dit().eval()
    assert net.null_class == 10 and net.y_embedder.weight.shape == (11, 32)
    z, t, h, _ = inputs(4)
    y = torch.tensor([3, 10, 0, 10])
    before = net(z, t, h, y)
    with torch.no_grad():
        net.y_embedder.weight[10].add_(1.0)
    after = net(z, t, h, y)
    changed = (before - after).flatten(1).abs().amax(1) > 0
    assert changed.tolist() == [False, True, False, True]


def test_label_dropout_feeds_the_null_class_to_the_network():
    net = tiny_dit().eval()
    z, t, h, y = inputs(64)
    dropped_labels, dropped = meanflow.drop_labels(y, net.null_class, 0.5, torch.Generator().manual_seed(0))
    assert 0 < dropped.sum() < 64
    out = net(z, t, h, dropped_labels)
    unconditional = net(z, t, h, torch.full_like(y, net.null_class))
    torch.testing.assert_close(out[dropped], unconditional[dropped], rtol=0, atol=0)
    assert not torch.allclose(out[~dropped], unconditional[~dropped])


def test_labels_required_exactly_when_class_conditional():
    net = tiny_dit()
    z, t, h, y = inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        net(z, t, h)
    uncond = tiny_dit(num_classes=0)
    assert uncond.y_embedder is None
    assert uncond(z, t, h).shape == z.shape
    with pytest.raises(ValueError, match="unconditional"):
        uncond(z, t, h, y)


# ----------------------------------------------------------------------------------------------
# Position table and patch layout


def test_position_table_matches_the_2d_sincos_formula():
    net = tiny_dit(perturb=False, dtype=torch.float32)
    table = net.pos_embed[0].double()  # [16 tokens, 32]
    grid, dim = 4, 32
    quarter = dim // 4
    for token in (0, 1, 5, 14):
        row, col = divmod(token, grid)
        want = []
        for pos in (col, row):  # columns in the first half, rows in the second (MAE / DiT)
            freqs = [10000 ** (-k / quarter) for k in range(quarter)]
            want += [math.sin(pos * w) for w in freqs] + [math.cos(pos * w) for w in freqs]
        torch.testing.assert_close(table[token], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)
    assert "pos_embed" not in net.state_dict()  # recomputed from the config, never stored


def test_unpatchify_inverts_dit_patch_order():
    net = tiny_dit(perturb=False)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    p, g = 2, 4
    # token (i, j) holds its p x p patch flattened as (row in patch, column in patch, channel)
    tokens = x.reshape(2, 4, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 4)
    assert torch.equal(net.unpatchify(tokens), x)


# ----------------------------------------------------------------------------------------------
# MeanFlow's use of it


def test_average_velocity_of_the_dit_is_direct():
    net = tiny_dit().eval()
    u = AverageVelocity(net, sigma_data=0.5)
    assert u.inputs == "direct" and u.null_class == 10
    z, t, _, y = inputs()
    r = t * 0.3
    torch.testing.assert_close(u(z, r, t, y), net(z, t, t - r, y), rtol=0, atol=0)
    unet = networks.build({"kind": "small_unet", "in_channels": 1, "resolution": 4, "channels": 8,
                           "channel_mult": [1, 2], "num_blocks": 1, "dual_time": True})
    assert AverageVelocity(unet).inputs == "edm"
    with pytest.raises(ValueError, match="unconditional"):
        AverageVelocity(unet)(torch.zeros(1, 1, 4, 4), 0.2, 0.5, torch.tensor([0]))


def test_jvp_through_the_dit_matches_finite_difference_float64():
    u = AverageVelocity(tiny_dit().eval())
    z, t, _, y = inputs()
    r = t * 0.4
    v = torch.randn_like(z)
    out, dudt = meanflow.mean_velocity_derivative(u, z, r, t, v, labels=y)
    torch.testing.assert_close(out, u(z, r, t, y), rtol=0, atol=0)
    eps = 1e-6
    fd = (u(z + eps * v, r, t + eps, y) - u(z - eps * v, r, t - eps, y)) / (2 * eps)
    assert dudt.abs().max() > 1e-2
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)


def test_model_file_round_trip_builds_the_direct_wrapper(tmp_path):
    arch = {**TINY, "dropout": 0.0}
    meta = {"architecture": arch, "precond": "meanflow", "sigma_data": 0.5, "sigma_min": 0.002,
            "sigma_max": 80.0, "time": "flow_t"}
    torch.manual_seed(3)
    u = checkpoints.build(meta)
    with torch.no_grad():
        for prm in u.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    path = tmp_path / "model.safetensors"
    checkpoints.save(path, ema=u, meta=meta)
    loaded, _ = checkpoints.load(path, which="ema")
    assert loaded.inputs == "direct"
    z, t, _, y = inputs(dtype=torch.float32)
    torch.testing.assert_close(loaded(z, 0.5 * t, t, y), u(z, 0.5 * t, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("change, word", [
    ({"preset": "MF-B/4"}, "either preset"),
    ({"preset": "MF-S/2", "depth": None, "hidden_size": None, "patch_size": None, "num_heads": None}, "unknown"),
    ({"depth": None}, "missing"),
    ({"dropout": 0.1}, "no dropout"),
    ({"dual_time": False}, "two times"),
    ({"resolution": 9}, "divisible"),
])
def test_bad_architectures_are_refused(change, word):
    arch = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=word):
        networks.build(arch)


def test_unknown_kind_lists_dit():
    with pytest.raises(ValueError, match="dit"):
        networks.build({"kind": "vit"})


def test_sincos_table_needs_hidden_divisible_by_four():
    from stages.networks.dit import sincos_pos_embed_2d

    assert np.allclose(sincos_pos_embed_2d(8, 2)[0], [0, 0, 1, 1, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2)
