"""bench/meanflow_terms.py: the MeanFlow loss split into its flow-matching (r = t) and average-velocity
(r != t) terms, against the same quantities computed by hand from the same draws."""

import importlib.util
from pathlib import Path

import torch
from test_meanflow import tiny_u

from stages.method import meanflow

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("meanflow_terms", REPO / "bench" / "meanflow_terms.py")
meanflow_terms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(meanflow_terms)

SECTION = {"P_mean": -0.4, "P_std": 1.0, "ratio_r_neq_t": 0.25, "adaptive_p": 1.0, "adaptive_c": 1e-3}


def test_terms_against_hand_computed_errors_and_gradients():
    torch.set_num_threads(1)
    u = tiny_u()
    images = torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = meanflow_terms.terms(u, images, None, SECTION, None, batches=1, batch=6, seed=3)
    x = images[torch.randint(20, (6,), generator=torch.Generator().manual_seed(3))]
    g = torch.Generator().manual_seed(3)
    r, t = meanflow.sample_r_t(6, g, ratio_r_neq_t=0.0)
    assert torch.equal(r, t)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)
    tt = t.reshape(-1, 1, 1, 1)
    z, v = (1 - tt) * x + tt * eps, eps - x
    err = (u(z, t, t) - v).flatten(1).square().sum(1)
    assert abs(out["flow_matching"]["mse"] - float(err.mean())) < 1e-9 * float(err.mean())
    weighted = err / (err.detach() + 1e-3)
    grad = torch.autograd.grad(0.75 * weighted.mean(), list(u.parameters()))
    norm = float(torch.cat([v.flatten() for v in grad]).norm())
    assert abs(out["flow_matching"]["grad_norm"] - norm) < 1e-9 * norm
    assert out["average_velocity"]["mse"] > 0 and -1 <= out["cosine"] <= 1
