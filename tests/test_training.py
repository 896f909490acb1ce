"""The shared training loop: RAdam warm-up handling, LR schedule, EMA, fail-fast, reproducibility."""

import copy

import pytest
import torch
import torch.nn.functional as F

from stages.core import rng
from stages.data.training_data import split_batch
from stages.training import loop
from stages.training.ema import EMA

torch.set_num_threads(1)

RADAM = {"name": "radam", "lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "schedule": "linear_to_zero"}
ADAM = {**RADAM, "name": "adam"}


# ----------------------------------------------------------------------------------------------
# RAdam's unrectified steps


def _count_unrectified(beta2, horizon=10_000):
    rho_inf = 2 / (1 - beta2) - 1
    count = 0
    for t in range(1, horizon + 1):
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        count += rho_t <= 5
    return count


@pytest.mark.parametrize("beta2", [0.999, 0.99, 0.95])
def test_radam_unrectified_steps_matches_independent_count(beta2):
    assert loop.radam_unrectified_steps(beta2) == _count_unrectified(beta2)


def test_radam_unrectified_steps_value_for_paper_betas():
    assert loop.radam_unrectified_steps(0.999) == 5


def test_radam_unrectified_steps_match_torch_radam():
    """Count torch RAdam's raw-gradient steps: with a constant gradient g = 1000 an unrectified
    step moves the parameter by lr * g, a rectified one by about lr."""
    p = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.RAdam([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    raw = []
    for _ in range(12):
        before = p.item()
        opt.zero_grad()
        (1000.0 * p).backward()
        opt.step()
        raw.append(abs(p.item() - before) > 0.5)
    n = loop.radam_unrectified_steps(0.999)
    assert raw == [True] * n + [False] * (12 - n)


def test_lr_zero_on_unrectified_radam_steps_only():
    n = loop.radam_unrectified_steps(0.999)
    total = 100
    for step in range(n):
        assert loop.lr_at(step, total, RADAM) == 0.0
        assert loop.lr_at(step, total, ADAM) == pytest.approx(2e-4 * (1 - step / total))
    assert loop.lr_at(n, total, RADAM) == pytest.approx(2e-4 * (1 - n / total))
    assert loop.lr_at(0, total, {**RADAM, "skip_unrectified": False}) == pytest.approx(2e-4)


# ----------------------------------------------------------------------------------------------
# LR schedules


def test_linear_to_zero():
    total = 1000
    n = loop.radam_unrectified_steps(0.999)
    for step in (n, 10, 250, 500, 999):
        assert loop.lr_at(step, total, RADAM) == pytest.approx(2e-4 * (1 - step / total), rel=1e-12)
    assert loop.lr_at(total, total, RADAM) == 0.0
    assert loop.lr_at(total + 5, total, RADAM) == 0.0  # never negative


def test_constant():
    cfg = {**ADAM, "lr": 1e-3, "schedule": "constant"}
    assert {loop.lr_at(s, 50, cfg) for s in range(50)} == {1e-3}


def test_warmup():
    cfg = {**ADAM, "lr": 1e-3, "schedule": "constant", "warmup_steps": 4}
    assert [loop.lr_at(s, 100, cfg) for s in range(6)] == pytest.approx(
        [0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3])
    cfg = {**cfg, "schedule": "linear_to_zero"}
    assert loop.lr_at(1, 100, cfg) == pytest.approx(1e-3 * 2 / 4 * (1 - 1 / 100))
    assert loop.lr_at(10, 100, cfg) == pytest.approx(1e-3 * 0.9)


def test_unknown_schedule_and_optimizer_rejected():
    with pytest.raises(ValueError, match="schedule"):
        loop.lr_at(0, 10, {**ADAM, "schedule": "cosine"})
    with pytest.raises(ValueError, match="optimizer"):
        loop.build_optimizer([torch.nn.Parameter(torch.zeros(1))], {**ADAM, "name": "lamb"})


# ----------------------------------------------------------------------------------------------
# EMA


class _One(torch.nn.Module):
    def __init__(self, value=0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0.0, dtype=torch.float64))


def test_beta_at():
    assert EMA(_One(), 0.999).beta_at(1) == 0.999
    assert EMA(_One(), 0.999).beta_at(10**6) == 0.999
    ema = EMA(_One(), 0.999, rampup=0.05)
    for n in (1, 10, 100, 1000, 13_862, 13_863, 10**5):
        want = min(0.999, 0.5 ** (1 / (0.05 * n)))
        assert ema.beta_at(n) == pytest.approx(want, rel=1e-12)
    # the half-life in steps is rampup * steps_done while the ramp binds
    n = 200
    assert ema.beta_at(n) ** (0.05 * n) == pytest.approx(0.5, rel=1e-12)
    assert ema.beta_at(10**5) == 0.999


@pytest.mark.parametrize("rampup", [None, 0.5])
def test_ema_update_hand_formula(rampup):
    net = _One(1.0)
    ema = EMA(net, 0.9, rampup=rampup)
    assert not ema.module.training and not ema.module.w.requires_grad
    expected = 1.0
    for step, value in enumerate([3.0, -2.0, 5.0], start=1):
        with torch.no_grad():
            net.w.fill_(value)
            net.count.fill_(step)
        ema.update(net, step)
        beta = 0.9 if rampup is None else min(0.9, 0.5 ** (1 / (rampup * step)))
        expected = beta * expected + (1 - beta) * value
        assert ema.module.w.item() == pytest.approx(expected, rel=1e-12)
        assert ema.module.count.item() == step  # buffers are copied, not averaged
    # by hand, no ramp: 0.9 * (0.9 * (0.9 * 1 + 0.1 * 3) + 0.1 * -2) + 0.1 * 5
    if rampup is None:
        assert ema.module.w.item() == pytest.approx(0.9 * (0.9 * 1.2 - 0.2) + 0.5, rel=1e-12)
    assert net.w.item() == 5.0  # the trained module is untouched


# ----------------------------------------------------------------------------------------------
# fit()


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 1)

    def forward(self, x):
        return self.lin(F.dropout(x, p=0.5, training=self.training))


def _run(seed, net, total_steps=6, opt_cfg=None, loss_override=None, on_step_end=None):
    opt_cfg = opt_cfg or {**ADAM, "lr": 1e-2, "schedule": "constant"}
    ema = EMA(net, 0.9)
    optimizer = loop.build_optimizer(net.parameters(), opt_cfg)
    target = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5])

    def loss_fn(step, part):
        if loss_override is not None:
            return loss_override(step, net)
        g = rng.generator(seed, step, "data")
        x = torch.randn(8, 6, generator=g)
        return (net(x).squeeze(1) - x @ target).square()

    loop.fit(stage="test", accelerator=loop.make_accelerator(), net=net, ema=ema,
                 optimizer=optimizer, opt_cfg=opt_cfg, total_steps=total_steps, batch=8, seed=seed,
                 loss_fn=loss_fn, on_step_end=on_step_end, status_every=1000)
    return net, ema


def _fresh_net():
    torch.manual_seed(0)
    return _Tiny()


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_fit_is_reproducible_with_dropout():
    init = _fresh_net()
    net_a, ema_a = _run(3, copy.deepcopy(init))
    torch.manual_seed(999)  # disturb the global RNG between the runs
    torch.rand(100)
    net_b, ema_b = _run(3, copy.deepcopy(init))
    for k, v in _state(net_a).items():
        assert torch.equal(v, net_b.state_dict()[k]), k
    for k, v in _state(ema_a.module).items():
        assert torch.equal(v, ema_b.module.state_dict()[k]), k
    assert not torch.equal(net_a.lin.weight, init.lin.weight)  # it trained

    # another seed -> other data and dropout draws -> other weights (the equality above is not trivial)
    net_c, _ = _run(4, copy.deepcopy(init))
    assert not torch.equal(net_a.lin.weight, net_c.lin.weight)


def test_fit_dropout_depends_on_fit_seed_not_only_data():
    init = _fresh_net()
    data_seed = 11

    def loss(step, net):
        g = rng.generator(data_seed, step, "data")
        x = torch.randn(8, 6, generator=g)
        return net(x).squeeze(1).square()

    a, _ = _run(1, copy.deepcopy(init), loss_override=loss)
    b, _ = _run(2, copy.deepcopy(init), loss_override=loss)
    c, _ = _run(1, copy.deepcopy(init), loss_override=loss)
    assert not torch.equal(a.lin.weight, b.lin.weight)
    assert torch.equal(a.lin.weight, c.lin.weight)


def test_fit_nan_loss_raises_naming_the_step():
    done = []

    def loss(step, net):
        out = net(torch.ones(4, 6)).squeeze(1).square()
        return out * float("nan") if step == 2 else out

    with pytest.raises(FloatingPointError, match=r"step 2\b"):
        _run(0, _fresh_net(), loss_override=loss, on_step_end=done.append)
    assert done == [1, 2]


def test_fit_nan_gradient_raises_naming_the_step():
    def loss(step, net):
        out = net(torch.ones(4, 6)).squeeze(1).square()
        if step == 1:  # finite value (0), but d sqrt(u)/du at u = 0 times 0 is nan
            return (net.lin.weight.sum() * 0).sqrt().expand(4)
        return out

    with pytest.raises(FloatingPointError, match=r"gradient norm is nan at step 1\b"):
        _run(0, _fresh_net(), loss_override=loss)


def test_fit_applies_lr_schedule_and_radam_skips_unrectified_steps(monkeypatch):
    cfg = {**RADAM, "lr": 1e-2}
    net = _fresh_net()
    init = net.lin.weight.detach().clone()
    n = loop.radam_unrectified_steps(0.999)
    total = n + 3
    built = []

    def build(params, c):
        built.append(torch.optim.RAdam(params, lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"]))
        return built[-1]

    monkeypatch.setattr(loop, "build_optimizer", build)
    seen = []
    _run(5, net, total_steps=total, opt_cfg=cfg,
         on_step_end=lambda done: seen.append((built[0].param_groups[0]["lr"], torch.equal(net.lin.weight, init))))
    lrs = [lr for lr, _ in seen]
    assert lrs == pytest.approx([loop.lr_at(s, total, cfg) for s in range(total)])
    assert lrs[:n] == [0.0] * n
    # lr 0 on RAdam's raw-gradient steps: the weights do not move until step n
    assert [unchanged for _, unchanged in seen] == [True] * n + [False] * 3


def test_fold_is_a_pure_63_bit_function():
    assert rng.fold(1, 2, "x") == rng.fold(1, 2, "x")
    assert rng.fold(1, 2, "x") != rng.fold(1, 2, "y") != rng.fold(2, 1, "y")
    assert all(0 <= rng.fold(i, "p") < 2**63 for i in range(50))
    a = torch.randn(3, generator=rng.generator(5, "q"))
    assert torch.equal(a, torch.randn(3, generator=rng.generator(5, "q")))


# ----------------------------------------------------------------------------------------------
# Gradient accumulation


def test_split_batch():
    assert split_batch(64, None, 2, "posttrain") == (32, 1)
    assert split_batch(64, 8, 2, "posttrain") == (8, 4)
    assert split_batch(64, 64, 1, "posttrain") == (64, 1)
    assert split_batch(64, 128, 1, "posttrain") == (64, 1)  # more room than the share needs
    with pytest.raises(ValueError, match="posttrain.batch_per_gpu: 12 samples per micro-batch do not divide the 32"):
        split_batch(64, 12, 2, "posttrain")
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        split_batch(64, 8, 3, "posttrain")


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_accumulation_gives_the_gradient_of_the_whole_batch(micro_batches):
    """One step over 8 samples in `micro_batches` parts leaves the gradient of the 8-sample mean
    loss (no dropout: the parts see exactly the samples of the whole batch), and one optimizer step."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randn(8)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    reference = copy.deepcopy(net)
    whole = torch.autograd.grad((reference(x).squeeze(1) - y).square().mean(), list(reference.parameters()))
    per, parts = 8 // micro_batches, []
    model = copy.deepcopy(net)

    def loss_fn(step, part):
        parts.append((step, part))
        sl = slice(part * per, (part + 1) * per)
        return (model(x[sl]).squeeze(1) - y[sl]).square()

    opt_cfg = {**ADAM, "lr": 1e-2, "schedule": "constant"}
    optimizer = loop.build_optimizer(model.parameters(), opt_cfg)
    loop.fit(stage="test", accelerator=loop.make_accelerator(), net=model, ema=EMA(model, 0.9),
             optimizer=optimizer, opt_cfg=opt_cfg, total_steps=1, batch=8, seed=0, loss_fn=loss_fn,
             status_every=1000, micro_batches=micro_batches)
    assert parts == [(0, k) for k in range(micro_batches)]
    assert all(int(s["step"]) == 1 for s in optimizer.state.values())  # one optimizer step
    for p, g, p0 in zip(model.parameters(), whole, net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        # Adam's first step moves each weight by lr x sign(grad) (up to eps): that of the whole batch
        big = g.abs() > 1e-6
        assert torch.equal(torch.sign(p0.detach() - p.detach())[big], torch.sign(g)[big])
