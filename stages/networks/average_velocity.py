"""MeanFlow's average-velocity model u(z, r, t) around a raw network with two time inputs
(docs/method.md#meanflow): the preconditioning of the flow-map students, as precond.py is the
denoisers' and consistency functions'."""

import torch
from torch import nn


class AverageVelocity(nn.Module):
    """u(z, r, t) for a raw network F with two time inputs, in one of two input conventions:

    - "edm" (the U-Nets of this pipeline): u = c_out F(c_in(t) z, c(t), c(t - r)).
      c_in = 1 / sqrt((1 - t)^2 sd^2 + t^2) gives F unit-variance inputs on the linear path at every
      t (EDM's c_in in flow-matching time), and c_out = sqrt(1 + sd^2) is the standard deviation of
      v = eps - x. Times enter as c(t) = 4 t (the sinusoidal embedding then spans about the same
      range as EDM's ln(sigma)/4 does). Defined at t = 1, where sigma would be infinite.
    - "direct" (MeanFlow's DiT, Geng et al. 2025): u = F(z, t, t - r). The network sees the state
      and the flow times as they are and returns u itself: the parameterisation MeanFlow's MF-B/4 ..
      MF-XL/2 recipes (learning rate, adaptive weight, guidance scales) were tuned with, on SD-VAE
      latents scaled by 0.18215 (a scale chosen for about unit variance, where c_in would stay
      within a factor sqrt(2) of 1 anyway).

    `inputs` defaults to the network's own `meanflow_inputs` ("direct" for the DiT), else "edm", so
    a model file builds the same u wherever it is loaded. A class-conditional network (one with
    `num_classes` > 0) takes `labels` [B] int64, its `null_class` being the unconditional one.
    """

    TIME_SCALE = 4.0
    INPUTS = ("edm", "direct")

    def __init__(self, model, sigma_data=0.5, inputs=None):
        super().__init__()
        if not getattr(model, "dual_time", False):
            raise ValueError("AverageVelocity needs a network built with dual_time: true")
        inputs = inputs or getattr(model, "meanflow_inputs", "edm")
        if inputs not in self.INPUTS:
            raise ValueError(f"AverageVelocity: inputs {inputs!r}; known: {list(self.INPUTS)}")
        self.model = model
        self.sigma_data = float(sigma_data)
        self.inputs = inputs
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.null_class = getattr(model, "null_class", None)

    def forward(self, z, r, t, labels=None):
        r = torch.as_tensor(r, dtype=z.dtype, device=z.device).expand(z.shape[0])
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[0])
        if labels is not None and not self.num_classes:
            raise ValueError("this network is unconditional: it takes no class labels")
        extra = () if labels is None else (labels,)
        if self.inputs == "direct":
            return self.model(z, t, t - r, *extra)
        tt = t.reshape(-1, 1, 1, 1)
        c_in = 1 / ((1 - tt) ** 2 * self.sigma_data**2 + tt**2).sqrt()
        c_out = (1 + self.sigma_data**2) ** 0.5
        return c_out * self.model(c_in * z, self.TIME_SCALE * t, self.TIME_SCALE * (t - r), *extra)
