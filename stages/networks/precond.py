"""Preconditioning of a raw network F into a denoiser / consistency function (docs/method.md#preconditioning).

EDM:  D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)),
      c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
      c_noise = ln(s) / 4.
ECM (the consistency student of ECT and CMT): the EDM coefficients in train mode, and in eval mode
(EMA, sampling, FID) the boundary-shifted pair
      c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = (s - s_min) sd / sqrt(s^2 + sd^2),
which makes f(x, s_min) = x exactly. The asymmetry is inherited from ECT and kept on purpose.
"""

import torch
from torch import nn

KINDS = ("edm", "ecm")


def edm_coefficients(sigma, sigma_data):
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def ecm_boundary_coefficients(sigma, sigma_data, sigma_min):
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


class Precond(nn.Module):
    """Wraps a raw network `model(x, c_noise)`; call as `precond(x, sigma)` with sigma of shape [B]."""

    def __init__(self, model, kind="edm", sigma_data=0.5, sigma_min=0.002):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"precond kind {kind!r} is not one of {KINDS}")
        self.model = model
        self.kind = kind
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)

    def coefficients(self, sigma):
        if self.kind == "ecm" and not self.training:
            return ecm_boundary_coefficients(sigma, self.sigma_data, self.sigma_min)
        return edm_coefficients(sigma, self.sigma_data)

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = self.coefficients(sigma)
        c_noise = sigma.log().flatten() / 4
        f = self.model((c_in * x).to(torch.float32), c_noise)
        return c_skip * x + c_out * f.to(torch.float32)
