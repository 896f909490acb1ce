"""A teacher's instantaneous velocity v(z_t, t) in flow-matching time (z_t = (1 - t) x + t eps,
t = 1 noise): what MeanFlow distillation regresses on in place of eps - x (docs/method.md#meanflow).

- An EDM teacher (precond edm, a denoiser D(x; sigma)) is read through stages/method/flowmap.py:
  sigma = t / (1 - t), x_sigma = z_t / (1 - t), and dz/dt = (x_sigma - (1 + sigma) D) / sigma,
  which is E[eps - x | z_t] for the exact denoiser.
- A MeanFlow teacher (precond meanflow, u(z, r, t)) gives its average velocity over an empty
  interval, u(z_t, t, t).

Both run without gradient, in eval mode, in float32 (the teacher's own precision on every device).
"""

import torch

from stages.data import labels as class_labels
from stages.method import flowmap


def edm_velocity_field(denoiser):
    """v(z, t, labels) of an EDM denoiser; t < 1 (t = 1 is sigma = inf, where no EDM state exists).
    The conversion runs in float64: at t near 1, 1 - t in float32 loses the digits sigma is made of.
    A class-conditional teacher takes one-hot labels and has no null class."""
    label_dim = class_labels.label_dim_of(denoiser)

    @torch.no_grad()
    def velocity(z, t, labels=None):
        t64 = torch.as_tensor(t, device=z.device).to(torch.float64).expand(z.shape[0])
        sigma = flowmap.t_to_sigma(t64)
        x = flowmap.flow_to_edm_state(z.to(torch.float64), t64)
        if label_dim:
            if labels is None:
                raise ValueError(f"the EDM teacher is class-conditional ({label_dim} classes): distillation "
                                 "needs the student's labels")
            if bool((labels >= label_dim).any()):
                raise ValueError(f"the EDM teacher has {label_dim} classes and no null class: a dropped label "
                                 "cannot be distilled from it (set posttrain_mf.label_dropout to 0)")
            onehot = torch.nn.functional.one_hot(labels, label_dim).to(torch.float32)
            denoised = denoiser(x.to(torch.float32), sigma.to(torch.float32), onehot)
        elif labels is not None:
            raise ValueError("the EDM teacher is unconditional: it takes no class labels")
        else:
            denoised = denoiser(x.to(torch.float32), sigma.to(torch.float32))
        return flowmap.edm_velocity(x, denoised.to(torch.float64), sigma).to(z.dtype)

    return velocity


def meanflow_velocity_field(u):
    """v(z, t, labels) = u(z, t, t[, labels]) of an average-velocity teacher."""

    @torch.no_grad()
    def velocity(z, t, labels=None):
        return flowmap.call_u(u, z, t, t, labels)

    return velocity


def velocity_field(model, meta):
    """The flow-time velocity of a teacher loaded from a model file (`meta`: its model.json), frozen."""
    model = model.eval().requires_grad_(False).to(torch.float32)
    precond = meta.get("precond")
    if precond == "meanflow":
        return meanflow_velocity_field(model)
    if precond == "edm":
        return edm_velocity_field(model)
    raise ValueError(f"a distillation teacher must be a diffusion model (precond edm) or a MeanFlow model "
                     f"(precond meanflow); this one has precond {precond!r}")
