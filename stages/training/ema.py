"""Exponential moving averages of a network's weights, what the training loop updates after every
optimizer step and what a model file stores under `ema.`; with `ema.kind: power`, EDM2's
power-function profiles beside it, kept for post-hoc reconstruction (stages/method/power_ema.py)."""

import copy

import numpy as np
import torch

from stages.method import power_ema


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
        _average(self.module, module, self.beta_at(steps_done))

    def to(self, device):
        self.module.to(device)
        return self

    def averages(self):
        """The averages the training state saves besides `module` (under `<name>.`): none."""
        return {}

    def weights(self, steps):
        """(w0, [w_1 .. w_steps]): what the average after `steps` steps holds of the initial weights and
        of the weights after each step (float64), from the decays beta_at(1 .. steps)."""
        betas = np.array([self.beta_at(s) for s in range(1, steps + 1)], dtype=np.float64)
        after = np.append(np.cumprod(betas[::-1])[::-1][1:], 1.0)  # prod of beta_j over j > i
        return float(np.prod(betas)), (1 - betas) * after

    def sigma_rel(self, steps):
        """The relative width of this average after `steps` steps, as the power profiles measure theirs."""
        w0, w = self.weights(steps)
        return power_ema.profile_sigma_rel(w0, w, steps)


class PowerEMA(EMA):
    """The per-step EMA of `beta` and `rampup` (what the model file and the FD-curve snapshots hold,
    as without the power kind) and beside it one power-function EMA per relative width in
    `sigma_rels` (EDM2), which the run keeps snapshots of for post-hoc reconstruction. After step t
    each profile of exponent gamma is updated with beta_t = (1 - 1/t)^(gamma + 1), so step 1
    replaces the initial weights: the profiles average the weights training made, not the init.
    `snapshots` maps each step to keep them at to one file name per profile (stages/config/power_ema.py)."""

    def __init__(self, module, beta, rampup, sigma_rels, snapshots):
        super().__init__(module, beta, rampup)
        self.sigma_rels = list(sigma_rels)
        self.gammas = [power_ema.gamma_of(s) for s in self.sigma_rels]
        self.profiles = [copy.deepcopy(self.module) for _ in self.sigma_rels]
        self.snapshots = dict(snapshots)

    @torch.no_grad()
    def update(self, module, steps_done):
        super().update(module, steps_done)
        for profile, gamma in zip(self.profiles, self.gammas, strict=True):
            _average(profile, module, power_ema.beta(steps_done, gamma))

    def to(self, device):
        for m in (self.module, *self.profiles):
            m.to(device)
        return self

    def averages(self):
        return {f"power_ema.{i}": profile for i, profile in enumerate(self.profiles)}


def _average(average, module, beta):
    """average <- beta average + (1 - beta) module over the parameters; the buffers copied."""
    for e, p in zip(average.parameters(), module.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - beta)
    for e, b in zip(average.buffers(), module.buffers(), strict=True):
        e.copy_(b)


class NoEMA(EMA):
    """For a recipe without an EMA (the latent VGG16 classifier): holds no copy and updates nothing,
    so the training state carries no second set of weights."""

    def __init__(self):
        self.module, self.beta, self.rampup = torch.nn.Module(), None, None

    def update(self, module, steps_done):
        pass
