"""The two passes of the ECT / ECD losses run in the official order (sony/cmt's ImageNet-512 `ECMLoss`,
`ECDGuidLoss`): the prediction with gradient first, whose EDM2 forced weight normalisation rescales the
stored weights in place, then the no-grad target with forced normalisation off. Checked on tiny EDM2
networks with raw (not unit-norm) weights against a computation written here from that description,
where the old order (target first) gives another loss and gradient; and on a network without forced
normalisation, where both orders give the same numbers, dropout masks and RNG stream."""

import contextlib
import copy
import math

import pytest
import torch

from stages import networks
from stages.method import losses
from stages.networks import edm2
from stages.networks.precond import Precond
from tests.tiny_edm2 import tiny_inputs, tiny_net

SD, C = 0.5, 0.06


def draws(y, seed, q, P_mean, P_std):
    """t, r, eps as the losses draw them (float32, n first, then eps), and x_t."""
    g = torch.Generator().manual_seed(seed)
    t = (P_mean + P_std * torch.randn(y.shape[0], generator=g, dtype=torch.float32)).exp()
    eps = torch.randn(y.shape, generator=g, dtype=torch.float32)
    r = (t - t * (1 + 8 * torch.sigmoid(-t)) / q).clamp(min=0)
    return t, r, eps


def force_normalise_by_hand(net):
    """EDM2's forced weight normalisation written out: each output channel's weight w_i becomes
    w_i / (1e-4 + ||w_i|| / sqrt(fan_in)), in place; then the flag off, so the passes below only
    normalise inside their forward (the standard weight normalisation, where the gradient flows)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, edm2.MPConv):
                w = m.weight
                norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
                w.copy_(w / (1e-4 + norm / math.sqrt(w[0].numel())))
                m.force_weight_norm = False


def pair_by_hand(ref, x_t, t, x_r, r, labels):
    """The official order on `ref`: normalise (the U-Net's weights: the uncertainty head takes no
    part in a forward), prediction with gradient, target without."""
    force_normalise_by_hand(ref.unet)
    pred = ref(x_t, t, labels)
    with torch.no_grad():
        target = ref(x_r, r, labels)
    return pred, target


def target_first(student, x_t, t, x_r, r, labels, context):
    """The order this project ran before: the target pass (forced normalisation off) first, then
    the prediction, which normalises the weights the target did not see."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), (context or contextlib.nullcontext)():
        target = student(x_r, r, labels)
    return student(x_t, t, labels), target


def grads(net):
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def snr_pair_loss(pred, target, t):
    d2 = (pred - target).flatten(1).square().sum(1)
    return ((d2 + C**2).sqrt() - C) * (t**2 + SD**2) / (t * SD) ** 2


def ect_pair_loss(pred, target, t, r, y):
    target = torch.where((r > 0).view(-1, 1, 1, 1), target, y)
    return (pred - target).flatten(1).norm(dim=1) / (t - r)


def test_raw_edm2_weights_official_order_matches_the_description_and_the_old_order_does_not():
    """ECD's pair loss (ect_snr_loss: shared noise, the ECD distance and weight) and ECT's
    (ect_loss, the ImageNet-64 ECT row) from raw weights: the loss and the gradient equal the
    description's to float precision, the weights left behind are the normalised ones, and the old
    order misses both by far more than that."""
    x, _, labels = tiny_inputs()
    y = x / (x.flatten(1).std(1).view(-1, 1, 1, 1) / SD)
    cases = {
        "ect_snr": (dict(q=64, c=C, sigma_data=SD), -0.8, 1.6, 64,
                    lambda p, tg, t, r: snr_pair_loss(p, tg, t)),
        "ect": (dict(stage=0, q=4, sigma_min=0.002), -1.1, 2.0, 4,
                lambda p, tg, t, r: ect_pair_loss(p, tg, t, r, y)),
    }
    for name, (kw, P_mean, P_std, q, by_hand) in cases.items():
        net = tiny_net(seed=3).train()
        ref, old = copy.deepcopy(net), copy.deepcopy(net)
        loss_fn = losses.ect_snr_loss if name == "ect_snr" else losses.ect_loss
        got = loss_fn(net, y, torch.Generator().manual_seed(5), P_mean=P_mean, P_std=P_std, labels=labels,
                      target_context=networks.target_context(net), **kw)
        got.sum().backward()

        t, r, eps = draws(y, 5, q, P_mean, P_std)
        r_eval = r if name == "ect_snr" else torch.where(r > 0, r, torch.full_like(r, 0.002))
        x_t, x_r = y + t.view(-1, 1, 1, 1) * eps, y + r_eval.view(-1, 1, 1, 1) * eps
        want = by_hand(*pair_by_hand(ref, x_t, t, x_r, r_eval, labels), t, r)
        want.sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grads(net), grads(ref), rtol=1e-5, atol=1e-7)
        for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)

        before = by_hand(*target_first(old, x_t, t, x_r, r_eval, labels, networks.target_context(old)), t, r)
        before.sum().backward()
        loss_gap = ((before - want).abs().max() / want.abs().max()).item()
        grad_gap = ((grads(old) - grads(ref)).norm() / grads(ref).norm()).item()
        assert loss_gap > 1e-5 and grad_gap > 1e-3, (name, loss_gap, grad_gap)


def test_unit_norm_weights_make_the_two_orders_agree():
    """Where the stored weights are already normalised (after a first step), forced normalisation
    changes them only by the eps, and the two orders agree closely: the difference above is the
    normalisation the target pass missed, nothing else."""
    x, _, labels = tiny_inputs()
    y = x / (x.flatten(1).std(1).view(-1, 1, 1, 1) / SD)
    net = tiny_net(seed=3).train()
    force_normalise_by_hand(net.unet)
    for m in net.modules():
        if isinstance(m, edm2.MPConv):
            m.force_weight_norm = True
    old = copy.deepcopy(net)
    new = losses.ect_snr_loss(net, y, torch.Generator().manual_seed(5), q=64, labels=labels,
                              target_context=networks.target_context(net))
    t, r, eps = draws(y, 5, 64, -0.8, 1.6)
    x_t, x_r = y + t.view(-1, 1, 1, 1) * eps, y + r.view(-1, 1, 1, 1) * eps
    before = snr_pair_loss(*target_first(old, x_t, t, x_r, r, labels, networks.target_context(old)), t)
    torch.testing.assert_close(new, before, rtol=1e-4, atol=1e-6)


def dropout_unet():
    torch.manual_seed(0)
    net = networks.build({"kind": "small_unet", "in_channels": 1, "resolution": 8, "channels": 8,
                          "channel_mult": [1, 2], "num_blocks": 1, "dropout": 0.5})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return Precond(net, kind="ecm").train()


@pytest.mark.parametrize("which", ["ect", "ect_snr"])
def test_without_forced_normalisation_the_order_changes_nothing(which, monkeypatch):
    """A pixel network with dropout 0.5: the official order gives the old order's loss and gradient
    exactly (the same dropout masks), and leaves the global RNG where the old order left it."""
    y = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)

    def run(seed=77):
        net = dropout_unet()
        assert networks.target_context(net) is None
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(1)
        value = losses.ect_loss(net, y, g, stage=0, q=2) if which == "ect" else losses.ect_snr_loss(net, y, g, q=64)
        value.sum().backward()
        return value, grads(net), torch.get_rng_state()

    new_value, new_grad, new_state = run()
    assert not torch.equal(run(seed=78)[0], new_value)  # dropout acts: another stream, another value
    with monkeypatch.context() as m:
        m.setattr(losses, "prediction_then_target", target_first)
        old_value, old_grad, old_state = run()
    assert torch.equal(new_value, old_value) and torch.equal(new_grad, old_grad)
    assert torch.equal(new_state, old_state)
