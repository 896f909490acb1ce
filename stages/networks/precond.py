"""Preconditioning of a raw network F into a denoiser / consistency function (docs/method.md#preconditioning).

EDM:  D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)),
      c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
      c_noise = ln(s) / 4.
ECM (the consistency student of ECT and CMT): the EDM coefficients in train mode, and in eval mode
(EMA, sampling, FID) the pair shifted to the boundary s_b (config sigma_boundary)
      c_skip = sd^2 / ((s - s_b)^2 + sd^2), c_out = (s - s_b) sd / sqrt(s^2 + sd^2),
which makes f(x, s_b) = x exactly. The asymmetry is inherited from ECT and kept on purpose.
"""

import torch
from torch import nn

KINDS = ("edm", "ecm")


def edm_coefficients(sigma, sigma_data):
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def ecm_boundary_coefficients(sigma, sigma_data, sigma_boundary):
    c_skip = sigma_data**2 / ((sigma - sigma_boundary) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_boundary) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


class Precond(nn.Module):
    """Wraps a raw network; call as `precond(x, sigma)` with sigma of shape [B] (or a scalar).

    A class-conditional network (one with `label_dim` > 0, e.g. EDM2's) is called
    `model(x, c_noise, labels)` and needs `precond(x, sigma, labels)` with one-hot labels
    [B, label_dim]; an unconditional one is called `model(x, c_noise)` and refuses labels."""

    network_name = "model"  # attribute of the raw network, hence the prefix of its tensors' names

    def __init__(self, model, kind="edm", sigma_data=0.5, sigma_boundary=0.002):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"precond kind {kind!r} is not one of {KINDS}")
        setattr(self, self.network_name, model)
        self.kind = kind
        self.sigma_data = float(sigma_data)
        self.sigma_boundary = float(sigma_boundary)

    @property
    def network(self):
        return getattr(self, self.network_name)

    @property
    def label_dim(self):
        return int(getattr(self.network, "label_dim", 0) or 0)

    def coefficients(self, sigma):
        if self.kind == "ecm" and not self.training:
            return ecm_boundary_coefficients(sigma, self.sigma_data, self.sigma_boundary)
        return edm_coefficients(sigma, self.sigma_data)

    def check_labels(self, labels, batch):
        """One-hot float labels [batch, label_dim] for a conditional network, None otherwise."""
        name = type(self.network).__name__
        if not self.label_dim:
            if labels is not None:
                raise ValueError(f"{name} is unconditional (label_dim 0) but class labels were given")
            return None
        if labels is None:
            raise ValueError(f"{name} is class-conditional (label_dim {self.label_dim}): pass one-hot labels "
                             f"[batch, {self.label_dim}] as precond(x, sigma, labels)")
        if not labels.is_floating_point() or tuple(labels.shape) != (batch, self.label_dim):
            raise ValueError(f"{name}: labels must be one-hot floats of shape [{batch}, {self.label_dim}], got "
                             f"{labels.dtype} {tuple(labels.shape)} "
                             f"(from class indices y: F.one_hot(y, {self.label_dim}).float())")
        return labels.to(torch.float32)

    def forward(self, x, sigma, labels=None, *, dtype=torch.float32):
        """`dtype`: what the raw network runs in (EDM2's use_fp16 execution: float16 on CUDA); the
        coefficients and the output stay float32."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        labels = self.check_labels(labels, x.shape[0])
        c_skip, c_out, c_in = self.coefficients(sigma)
        c_noise = sigma.log().flatten() / 4
        x_in = (c_in * x).to(dtype)
        f = self.network(x_in, c_noise) if labels is None else self.network(x_in, c_noise, labels)
        return c_skip * x + c_out * f.to(torch.float32)
