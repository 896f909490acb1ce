"""Exponential moving averages of a network's weights, what the training loop updates after every
optimizer step and what a model file stores under `ema.`."""

import copy

import torch


class EMA:
    """ema <- beta ema + (1 - beta) theta after every step.

    With `rampup` set, the half-life (in steps) is capped at rampup * steps_done, so a short run's
    EMA forgets its initialisation (a fixed 0.9999 over 2,000 steps keeps ~80 % of the initial
    weights and flatters whichever init was best). The official recipes use rampup = None.
    """

    def __init__(self, module, beta, rampup=None):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.beta = beta
        self.rampup = rampup

    def beta_at(self, steps_done):
        beta = self.beta
        if self.rampup:
            beta = min(beta, 0.5 ** (1 / max(self.rampup * steps_done, 1e-8)))
        return beta

    @torch.no_grad()
    def update(self, module, steps_done):
        beta = self.beta_at(steps_done)
        for e, p in zip(self.module.parameters(), module.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - beta)
        for e, b in zip(self.module.buffers(), module.buffers(), strict=True):
            e.copy_(b)


class NoEMA(EMA):
    """For a recipe without an EMA (the latent VGG16 classifier): holds no copy and updates nothing,
    so the training state carries no second set of weights."""

    def __init__(self):
        self.module, self.beta, self.rampup = torch.nn.Module(), None, None

    def update(self, module, steps_done):
        pass
