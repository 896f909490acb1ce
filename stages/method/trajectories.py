"""Teacher trajectories as pure functions of (teacher, solver spec, base seed, index): what the
trajectory_shard stage writes and what mid-training's spot check regenerates."""

import numpy as np
import torch

from stages.training import rng
from stages.method import solvers

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


class Generator:
    """Solves the teacher's PF-ODE for given trajectory indices of one spec."""

    def __init__(self, teacher, meta, spec, device, data=None):
        self.teacher = teacher.to(device).eval().to(torch.float32)
        self.spec, self.device, self.data = spec, device, data
        arch = meta["architecture"]
        self.shape = (arch["in_channels"], arch["resolution"], arch["resolution"])
        self.sigmas = solvers.logsnr_grid(spec["nfe"], spec["sigma_max"], spec["sigma_min"])
        self.solve = solvers.SOLVERS[spec["solver"]]
        self.dtype = STORE_DTYPES[spec["dtype"]]
        if spec["x_T"] == "data_plus_noise" and data is None:
            raise ValueError("x_T = data_plus_noise needs the prepared dataset")

    @torch.no_grad()
    def denoise(self, x, sigma):
        return self.teacher(x, torch.full((x.shape[0],), sigma, device=self.device))

    def start_point(self, i):
        g = rng.generator(self.spec["seed"], i, "x_T")
        x = self.spec["sigma_max"] * torch.randn(self.shape, generator=g)
        meta = {"index": i, "seed": self.spec["seed"]}
        if self.data is not None:  # the official code's start: a real image plus 80 z (docs/method.md#paper-and-code)
            j = int(torch.randint(len(self.data), (1,), generator=g))
            x = self.data[j] + x
            meta["data_index"] = j
        return x, meta

    def batch(self, indices):
        """[(index, states in the store dtype [K+1, C, H, W], sigmas float64 [K+1], meta)] for `indices`."""
        starts = [self.start_point(i) for i in indices]
        x = torch.stack([s[0] for s in starts]).to(self.device)
        states = self.solve(self.denoise, x, self.sigmas, order=self.spec["order"],
                            lower_order_final=self.spec["lower_order_final"]).cpu().numpy()
        out = []
        for (_, meta), i, traj in zip(starts, indices, states):
            stored = traj.astype(self.dtype)
            if not np.isfinite(stored).all():
                raise FloatingPointError(f"trajectory {i} overflows {self.spec['dtype']}; store float32")
            out.append((i, stored, self.sigmas.numpy(), meta))
        return out
